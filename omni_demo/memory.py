"""`python -m omni_demo.memory`: what a model needs in memory at each precision (omni_demo/models/memory.py)."""

import sys

from omni_demo.models.loading import quiet_libraries
from omni_demo.models.memory import main

if __name__ == "__main__":
    quiet_libraries()
    sys.exit(main())
