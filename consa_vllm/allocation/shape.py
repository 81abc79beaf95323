"""The attention shape of a model, read from its HF ``config.json`` without importing torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .format import read_json_object


@dataclass(frozen=True)
class ModelShape:
    """What an allocation and the KV estimator need to know about a decoder."""

    num_layers: int
    num_kv_heads: int
    num_attention_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a ``transformers.PretrainedConfig`` or a plain ``config.json`` dict."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (
            lambda k, d=None: getattr(config, k, d))
        # Multimodal wrappers keep the decoder under text_config.
        text = get("text_config")
        if text is not None and get("num_hidden_layers") is None:
            return cls.from_config(text)
        n_layers, n_heads = get("num_hidden_layers"), get("num_attention_heads")
        if n_layers is None or n_heads is None:
            raise ValueError("config has no num_hidden_layers/num_attention_heads: not a decoder LM config")
        n_layers, n_heads = _count("num_hidden_layers", n_layers), _count("num_attention_heads", n_heads)
        n_kv = get("num_key_value_heads")
        n_kv = n_heads if n_kv is None else _count("num_key_value_heads", n_kv)
        head_dim = get("head_dim")
        if head_dim is None:
            hidden = get("hidden_size")
            if hidden is None:
                raise ValueError("config has neither head_dim nor hidden_size: the head size is unknown")
            head_dim = _count("hidden_size", hidden) // n_heads
        return cls(n_layers, n_kv, n_heads, _count("head_dim", head_dim))

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "ModelShape":
        """From ``<path>/config.json``; errors name the file."""
        cfg = Path(path) / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"{cfg}: not found (is {path} a Hugging Face model directory?)")
        data = read_json_object(cfg, ValueError, what="a config.json file")
        try:
            return cls.from_config(data)
        except ValueError as e:
            raise ValueError(f"{cfg}: {e}") from None


def _count(field: str, value: Any) -> int:
    """A config field that must be a positive whole number (not a boolean, a string or 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"field '{field}' must be a positive integer, got {json.dumps(value, default=str)}")
    return value
