"""omni-demo: stream Qwen2.5-Omni's text and speech at the same time."""

__version__ = "0.1.0"

import logging as _logging

# torchao (which transformers imports when it is installed) registers enums in a way torch 2.14 warns
# about on every start; nothing for our users to act on.
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
