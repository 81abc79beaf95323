"""Make the tests' quantized tiny checkpoints into DIR, to carry to a machine without the
quantization libraries (the GPU machine): ``python tests/make_quant_checkpoints.py DIR``,
then ``CONSA_QUANT_CHECKPOINTS=DIR`` there. Needs ``make quant-env`` here.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_harness import checkpoints  # noqa: E402
from test_gpu_quant import SCHEMES  # noqa: E402

if __name__ == "__main__":
    # The tests' model and its sharp-attention copy (test_gpu_quant.py's two calibrated tests).
    for model in ("qwen3", "qwen3-sharp"):
        for scheme, d in checkpoints(Path(sys.argv[1]), SCHEMES, model=model).items():
            print(model, scheme, d)
