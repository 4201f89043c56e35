"""`python -m selective_attention.cli ...` (also `accelerate launch -m selective_attention.cli ...`)."""

import sys

from selective_attention.cli import main

sys.exit(main())
