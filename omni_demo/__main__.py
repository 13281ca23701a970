import sys

from omni_demo.cli import main

sys.exit(main())
