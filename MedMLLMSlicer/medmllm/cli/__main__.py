"""`python -m medmllm.cli`: the `medmllm` console script, for the Slicer module's local backend."""

import sys

from medmllm.cli import main

sys.exit(main())
