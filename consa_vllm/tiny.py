"""Tiny Hugging Face models built locally: no machine here can reach a model hub.

Used by the tests, the demo and the benchmarks. The tokenizer is a byte-level BPE
trained with the ``tokenizers`` library on Python source files of the running
interpreter, a corpus that is always present.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_python_files(limit: int | None = None) -> list[Path]:
    """Python source files of the standard library, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    return files[:limit] if limit else files


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, files: list[Path] | None = None):
    """Train a byte-level BPE tokenizer on local Python files and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [p.read_text(errors="ignore") for p in (files or stdlib_python_files(40))]
    tok.train_from_iterator(texts, trainer=trainer)
    chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=chat_template)
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(
    out_dir: str | Path,
    family: str | None = None,
    num_layers: int = 4,
    num_attention_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    dtype: str = "float32",
    tokenizer: bool = True,
    **config_fields,
) -> Path:
    """Save a randomly initialised model of a supported family (and a tokenizer) to ``out_dir``.

    ``family`` is a name of :mod:`consa_vllm.families` (default: its ``DEFAULT_FAMILY``); a
    mixture-of-experts family gets the registry's tiny expert setup (several experts,
    top-k > 1). ``config_fields`` are extra HF config fields (e.g. ``attention_bias=True``).
    Biases and expert weights get the same random init as the other matrices, so that
    a loader dropping any of them changes the model's outputs.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from consa_vllm import families

    fam = families.by_name(family or families.DEFAULT_FAMILY)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
                  num_key_value_heads=num_kv_heads, head_dim=head_dim,
                  max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                  dtype=dtype, rope_theta=10000.0)
    if fam.head_dim_from_hidden:
        common["hidden_size"] = num_attention_heads * head_dim
    config = AutoConfig.for_model(fam.model_type, **{**common, **fam.tiny, **config_fields})
    config.architectures = [fam.hf_architecture]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # Larger-than-default init so attention patterns (and so F vs S) visibly matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith(".bias"):
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(out))
    if tokenizer:
        build_tokenizer(out, vocab_size=vocab_size)
    return out
