"""``python -m consa_vllm.eval``: see ``--help``."""

import sys

from .cli import main

sys.exit(main())
