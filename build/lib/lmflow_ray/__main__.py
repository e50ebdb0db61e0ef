"""`python -m lmflow_ray ...` is `lmflow-ray ...` (for clusters where the script is not on PATH)."""

import sys

from lmflow_ray.cli import main

sys.exit(main())
