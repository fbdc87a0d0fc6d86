"""`python -m medmllm.cli`: the same as the `medmllm` console script (used by the Slicer module's local backend)."""

import sys

from medmllm.cli import main

sys.exit(main())
