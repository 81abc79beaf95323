"""Debug start-up for the GPU tests' engine processes (never installed; a variant puts this
folder on PYTHONPATH): with ``CONSA_DEBUG_FILL_UNINITIALIZED=1``, PyTorch fills every new
tensor from ``torch.empty`` (and the like) with NaN, so a kernel that reads memory before it is
written produces NaN instead of whatever the memory held. The intermittent wrong Mixtral
engines (benchmarks/results/gpu_parity_h200/README.md, run 14) look like such a read.
"""

import os

if os.environ.get("CONSA_DEBUG_FILL_UNINITIALIZED") == "1":
    import torch
    import torch.utils.deterministic

    # warn_only: ops without a deterministic variant warn instead of raising.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
