"""Save the stage-2 model with its allocation, ready for the vLLM plugin."""

from __future__ import annotations

import shutil
from pathlib import Path

from consa_vllm.allocation import Allocation
from consa_vllm.export import export_model
from consa_vllm.outputs import make_temp_dir, remove_stale_temps


def save_trained_model(model, tokenizer, alloc: Allocation, out_dir: Path, source: str,
                       state_dict: dict | None = None) -> Path:
    """``save_pretrained`` into a temp dir next to ``out_dir``, then export with the allocation.

    ``state_dict``: the full weights to write instead of ``model.state_dict()`` (FSDP: the
    gathered shards).

    Uses :func:`consa_vllm.export.export_model` (ConSA architecture name, allocation under
    ``config.json["consa"]``, no global sliding window), which renames into place atomically.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir, "consa-trained")  # left by a run killed while saving (SIGKILL)
    tmp = make_temp_dir(out_dir, "consa-trained")
    try:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))
        for extra in ("generation_config.json",):  # keep what save_pretrained may not write
            src = Path(source) / extra
            if src.is_file() and not (tmp / extra).exists():
                shutil.copy2(src, tmp / extra)
        # out_dir is absent or empty (checked before training); weights are copied, not linked,
        # because the temporary source is deleted afterwards.
        return export_model(tmp, alloc, out_dir, link=False, force=out_dir.exists())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

