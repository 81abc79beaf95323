"""Attention kernels of the reference: full causal (FA), sliding window (SWA) and their per-head mix.

Pure functions on tensors, no model code. Shapes follow HF transformers' attention interface:
``query`` is ``[B, Hq, Tq, D]``, ``key``/``value`` are ``[B, Hkv, Tk, D]`` (before the GQA repeat),
and the result is ``[B, Hq, Tq, D]``. Query head ``j`` belongs to KV head ``j // G`` (``G = Hq // Hkv``),
the layout of HF's ``repeat_kv``.

Positions. Keys are cache slots ``0 .. Tk-1``; the queries are the last ``Tq`` of them, so query ``i``
sits at slot ``Tk - Tq + i``. This holds without a cache and with HF's ``DynamicCache`` (the default
of ``generate``); ``StaticCache`` is not supported. The window is measured in slots, as HF's
``sliding_window_overlay`` does: with left padding the real tokens of a row are contiguous, so
slot distance equals token distance.

Window semantics (docs/DESIGN.md §4): query at slot ``i`` sees keys ``i-W+1 .. i``, itself included.

Masks. ``attention_mask`` is what the model built for a full-attention layer (padding, packing):
``None`` (plain causal, SDPA's ``is_causal``), a boolean ``[B|1, 1, Tq, Tk]`` (True = attend) or an
additive float mask of that shape. The S heads use that mask AND one band mask ``[Tq, Tk]`` shared by
all S heads and the whole batch, never a per-head ``T x T`` mask.

SWA backends (``swa_backend``):
- ``"sdpa"``: one SDPA call over all keys with the band mask. Simple; costs O(Tq*Tk) compute and a
  bool ``Tq x Tk`` mask (64 MiB at 8k, 1 GiB at 32k). SDPA cannot use its flash kernel with a mask.
- ``"chunked"``: query blocks of ``chunk`` tokens, each attending only to its ``chunk + W - 1`` keys
  with a small block-local mask. O(Tq*(chunk+W)) compute and memory; wins when ``W << T``.
- ``"auto"`` (default): ``chunked`` when ``Tq > 2 * (chunk + W)`` else ``sdpa``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SWA_BACKENDS = ("auto", "sdpa", "chunked")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, Hkv, T, D] -> [B, Hkv*n_rep, T, D]``, each KV head repeated for its query group."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _slice_static_prefill(q, k, v, mask):
    """HF drops empty future key slots when the mask was skipped and ``Tk > Tq`` (static-cache prefill)."""
    tq, tk = q.shape[2], k.shape[2]
    if mask is None and 1 < tq < tk:
        return k[:, :, :tq], v[:, :, :tq]
    return k, v


def full_attention(q, k, v, mask, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention, the same SDPA call as HF's ``sdpa_attention_forward``.

    ``k``/``v`` already have as many heads as ``q``. Returns ``[B, H, Tq, D]``.
    """
    k, v = _slice_static_prefill(q, k, v, mask)
    # With no mask the model relied on is_causal: prefill (Tq == Tk) is causal, one-token decode sees all.
    is_causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          is_causal=is_causal)


def band_mask(tq: int, tk: int, window: int, device, q_start: int | None = None, k_start: int = 0) -> torch.Tensor:
    """Boolean ``[tq, tk]``: True where ``q_slot - W < k_slot <= q_slot``.

    Query ``i`` sits at slot ``q_start + i`` (default: the last ``tq`` of ``tk`` slots); key ``j`` at
    ``k_start + j``. Includes causality, so it alone is the SWA mask of an unpadded sequence.
    """
    if q_start is None:
        q_start = k_start + tk - tq
    qs = torch.arange(q_start, q_start + tq, device=device)[:, None]
    ks = torch.arange(k_start, k_start + tk, device=device)[None, :]
    return (ks <= qs) & (ks > qs - window)


def _combine(mask: torch.Tensor | None, band: torch.Tensor, dtype) -> torch.Tensor:
    """The model's mask AND the band, in the model mask's convention (bool, or additive float)."""
    if mask is None:
        return band
    if mask.dtype == torch.bool:
        return mask & band
    return mask.masked_fill(~band, torch.finfo(mask.dtype).min)


def sliding_attention(q, k, v, mask, scaling: float, window: int, dropout: float = 0.0,
                      backend: str = "auto", chunk: int = 1024) -> torch.Tensor:
    """Causal sliding-window attention: query at slot i sees keys i-W+1..i (and what ``mask`` allows).

    ``k``/``v`` already have as many heads as ``q``. Returns ``[B, H, Tq, D]``.
    """
    k, v = _slice_static_prefill(q, k, v, mask)
    tq, tk = q.shape[2], k.shape[2]
    if backend == "auto":
        backend = "chunked" if tq > 2 * (chunk + window) else "sdpa"
    if backend == "sdpa" or tq <= chunk:
        m = _combine(mask, band_mask(tq, tk, window, q.device), q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout, scale=scaling)
    if backend != "chunked":
        raise ValueError(f"swa backend must be one of {SWA_BACKENDS}, got {backend!r}")
    # Query block [qs, qe) needs keys [qs' - W + 1, qe') in slot space, nothing else.
    offset = tk - tq
    outs = []
    for qs in range(0, tq, chunk):
        qe = min(qs + chunk, tq)
        ke = offset + qe
        ks = max(0, offset + qs - window + 1)
        m = band_mask(qe - qs, ke - ks, window, q.device, q_start=offset + qs, k_start=ks)
        if mask is not None:
            m = _combine(mask[..., qs:qe, ks:ke], m, q.dtype)
        outs.append(F.scaled_dot_product_attention(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke],
                                                   attn_mask=m, dropout_p=dropout, scale=scaling))
    return torch.cat(outs, dim=2)


def hybrid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    window: int,
    *,
    full_kv_heads: list[int] | None = None,
    gates: torch.Tensor | None = None,
    dropout: float = 0.0,
    swa_backend: str = "auto",
    chunk: int = 1024,
) -> torch.Tensor:
    """One layer of ConSA attention. Returns ``[B, Hq, Tq, D]``.

    Exactly one mode:
    - ``gates`` (float ``[Hkv]``): per KV head ``z*FA + (1-z)*SWA``, for all its query heads.
      Both branches run on every head (the gradient w.r.t. z needs ``FA - SWA``); differentiable in z.
    - ``full_kv_heads`` (sorted KV head indices that are F; the rest are S): FA runs only on the
      F heads' query groups, SWA only on the S heads', and the outputs are scattered back in place.
    """
    b, hq, tq, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    if gates is not None:
        fa = full_attention(query, repeat_kv(key, g), repeat_kv(value, g), attention_mask, scaling, dropout)
        swa = sliding_attention(query, repeat_kv(key, g), repeat_kv(value, g), attention_mask, scaling, window,
                                dropout, swa_backend, chunk)
        z = gates.to(device=fa.device, dtype=fa.dtype).repeat_interleave(g).view(1, hq, 1, 1)
        return swa + z * (fa - swa)

    if full_kv_heads is None:
        raise ValueError("hybrid_attention needs either gates or full_kv_heads")
    if len(full_kv_heads) == hkv:
        return full_attention(query, repeat_kv(key, g), repeat_kv(value, g), attention_mask, scaling, dropout)
    if len(full_kv_heads) == 0:
        return sliding_attention(query, repeat_kv(key, g), repeat_kv(value, g), attention_mask, scaling, window,
                                 dropout, swa_backend, chunk)

    dev = query.device
    f_kv = torch.tensor(full_kv_heads, device=dev)
    s_kv = torch.tensor([h for h in range(hkv) if h not in set(full_kv_heads)], device=dev)
    f_q = (f_kv[:, None] * g + torch.arange(g, device=dev)).flatten()
    s_q = (s_kv[:, None] * g + torch.arange(g, device=dev)).flatten()
    out_f = full_attention(query.index_select(1, f_q), repeat_kv(key.index_select(1, f_kv), g),
                           repeat_kv(value.index_select(1, f_kv), g), attention_mask, scaling, dropout)
    out_s = sliding_attention(query.index_select(1, s_q), repeat_kv(key.index_select(1, s_kv), g),
                              repeat_kv(value.index_select(1, s_kv), g), attention_mask, scaling, window,
                              dropout, swa_backend, chunk)
    # Scatter back: concatenated order is [F query heads, S query heads]; invert that permutation.
    inverse = torch.argsort(torch.cat([f_q, s_q]))
    return torch.cat([out_f, out_s], dim=1).index_select(1, inverse)
