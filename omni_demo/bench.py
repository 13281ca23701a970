"""`python -m omni_demo.bench`: the benchmark's entry point (omni_demo/tools/bench.py)."""

import sys

from omni_demo.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
