"""``python -m consa_vllm.eval`` (also ``consa-vllm eval``): see ``--help``."""

import sys

from .cli import main

# Its own name in usage and errors, as ``python -m consa_vllm.train`` does.
sys.exit(main(prog="python -m consa_vllm.eval"))
