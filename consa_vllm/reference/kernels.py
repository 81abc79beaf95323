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
With ``sink > 0`` (attention sinks, StreamingLLM) an S head also sees the first ``sink`` tokens of its
sequence: keys ``0 .. sink-1`` and ``i-W+1 .. i``, causal. Without a model mask the sink tokens are slots
``0 .. sink-1``; with one, they are each row's first ``sink`` real tokens (the slots some query may
attend), so left padding moves them with the row's start. A packed row with a document mask gets the
row's first tokens as sinks, not each document's.

Masks. ``attention_mask`` is what the model built for a full-attention layer (padding, packing):
``None`` (plain causal, SDPA's ``is_causal``), a boolean ``[B|1, 1, Tq, Tk]`` (True = attend) or an
additive float mask of that shape. The S heads use that mask AND one band mask ``[Tq, Tk]`` shared by
all S heads and the whole batch, never a per-head ``T x T`` mask.

SWA backends (``swa_backend``):
- ``"sdpa"``: one SDPA call over all keys with the band mask. Simple; costs O(Tq*Tk) compute and a
  bool ``Tq x Tk`` mask (64 MiB at 8k, 1 GiB at 32k). SDPA cannot use its flash kernel with a mask.
- ``"chunked"``: query blocks of ``chunk`` tokens, each attending only to its ``chunk + W - 1`` keys
  with a small block-local mask. O(Tq*(chunk+W)) compute and memory; wins when ``W << T``.
  With sinks each block also attends to the sink slots before its keys (``sink`` more keys).
- ``"auto"`` (default): ``chunked`` when ``Tq > 2 * (chunk + W + sink)`` else ``sdpa``.
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


def sink_slots(mask: torch.Tensor | None, tk: int, sink: int, device) -> torch.Tensor:
    """Boolean ``[B|1, 1, 1, tk]``: True at the key slots that hold a row's first ``sink`` tokens.

    Without a mask these are slots ``0 .. sink-1``. With one, a slot holds a real token when some
    query may attend to it (padding is masked for every query), and the first ``sink`` real slots
    of each row are its sinks.
    """
    if mask is None:
        return (torch.arange(tk, device=device) < sink).view(1, 1, 1, tk)
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    real = allowed.any(dim=-2, keepdim=True)
    return real & (real.cumsum(dim=-1) <= sink)


def _sliding_allowed(tq: int, tk: int, window: int, sinks: torch.Tensor | None, device, q_start: int,
                     k_start: int = 0) -> torch.Tensor:
    """The band of :func:`band_mask`, OR (with ``sinks``) the causal sink slots; bool ``[tq, tk]`` or 4D."""
    band = band_mask(tq, tk, window, device, q_start=q_start, k_start=k_start)
    if sinks is None:
        return band
    qs = torch.arange(q_start, q_start + tq, device=device)[:, None]
    ks = torch.arange(k_start, k_start + tk, device=device)[None, :]
    return band | (sinks[..., k_start:k_start + tk] & (ks <= qs))


def _combine(mask: torch.Tensor | None, band: torch.Tensor, dtype) -> torch.Tensor:
    """The model's mask AND the band, in the model mask's convention (bool, or additive float)."""
    if mask is None:
        return band
    if mask.dtype == torch.bool:
        return mask & band
    return mask.masked_fill(~band, torch.finfo(mask.dtype).min)


def sliding_attention(q, k, v, mask, scaling: float, window: int, dropout: float = 0.0,
                      backend: str = "auto", chunk: int = 1024, sink: int = 0) -> torch.Tensor:
    """Causal sliding-window attention: query at slot i sees keys i-W+1..i (and what ``mask`` allows),
    plus the first ``sink`` tokens of its row (see the module docstring).

    ``k``/``v`` already have as many heads as ``q``. Returns ``[B, H, Tq, D]``.
    """
    k, v = _slice_static_prefill(q, k, v, mask)
    tq, tk = q.shape[2], k.shape[2]
    offset = tk - tq
    # sink == 0 builds exactly the masks it built before sinks existed.
    sinks = sink_slots(mask, tk, sink, q.device) if sink > 0 else None
    if backend == "auto":
        backend = "chunked" if tq > 2 * (chunk + window + sink) else "sdpa"
    if backend == "sdpa" or tq <= chunk:
        m = _combine(mask, _sliding_allowed(tq, tk, window, sinks, q.device, q_start=offset), q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout, scale=scaling)
    if backend != "chunked":
        raise ValueError(f"swa backend must be one of {SWA_BACKENDS}, got {backend!r}")
    # Query block [qs, qe) needs keys [qs' - W + 1, qe') in slot space, and the sink slots before them.
    # Sink slots end at sink_end (the last row's last sink slot + 1; just ``sink`` without a mask).
    sink_end = 0
    if sinks is not None:
        used = sinks.reshape(-1, tk).any(dim=0).nonzero()
        sink_end = int(used.max()) + 1 if used.numel() else 0
    outs = []
    for qs in range(0, tq, chunk):
        qe = min(qs + chunk, tq)
        ke = offset + qe
        ks = max(0, offset + qs - window + 1)
        # Sink slots inside [ks, ke) are allowed by this mask; those before ks are prepended below.
        m = _sliding_allowed(qe - qs, ke - ks, window, sinks, q.device, q_start=offset + qs, k_start=ks)
        if mask is not None:
            m = _combine(mask[..., qs:qe, ks:ke], m, q.dtype)
        kb, vb = k[:, :, ks:ke], v[:, :, ks:ke]
        s_end = min(sink_end, ks)
        if s_end > 0:
            # Every query of the block is at a slot >= ks > these keys: only the sink test remains.
            sm = sinks[..., :s_end].expand(*sinks.shape[:2], qe - qs, s_end)
            if mask is not None:
                sm = _combine(mask[..., qs:qe, :s_end], sm, q.dtype)
            m = m if m.dim() == 4 else m.view(1, 1, *m.shape)
            lead = torch.broadcast_shapes(sm.shape[:2], m.shape[:2])
            m = torch.cat([sm.expand(*lead, -1, -1), m.expand(*lead, -1, -1)], dim=-1)
            kb = torch.cat([k[:, :, :s_end], kb], dim=2)
            vb = torch.cat([v[:, :, :s_end], vb], dim=2)
        outs.append(F.scaled_dot_product_attention(q[:, :, qs:qe], kb, vb, attn_mask=m, dropout_p=dropout,
                                                   scale=scaling))
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
    sink: int = 0,
) -> torch.Tensor:
    """One layer of ConSA attention. Returns ``[B, Hq, Tq, D]``.

    S heads attend to the ``sink`` first tokens and the last ``window`` (``sink=0``: a plain window).
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
        # One repeated K and V for both branches: a second copy would cost [B, Hq, Tk, D] twice more
        # per layer, kept until backward (autograd saves the SDPA inputs).
        k_rep, v_rep = repeat_kv(key, g), repeat_kv(value, g)
        fa = full_attention(query, k_rep, v_rep, attention_mask, scaling, dropout)
        swa = sliding_attention(query, k_rep, v_rep, attention_mask, scaling, window, dropout, swa_backend, chunk,
                                sink)
        z = gates.to(device=fa.device, dtype=fa.dtype).repeat_interleave(g).view(1, hq, 1, 1)
        return swa + z * (fa - swa)

    if full_kv_heads is None:
        raise ValueError("hybrid_attention needs either gates or full_kv_heads")
    if len(full_kv_heads) == hkv:
        return full_attention(query, repeat_kv(key, g), repeat_kv(value, g), attention_mask, scaling, dropout)
    if len(full_kv_heads) == 0:
        return sliding_attention(query, repeat_kv(key, g), repeat_kv(value, g), attention_mask, scaling, window,
                                 dropout, swa_backend, chunk, sink)

    dev = query.device
    f_kv = torch.tensor(full_kv_heads, device=dev)
    s_kv = torch.tensor([h for h in range(hkv) if h not in set(full_kv_heads)], device=dev)
    f_q = (f_kv[:, None] * g + torch.arange(g, device=dev)).flatten()
    s_q = (s_kv[:, None] * g + torch.arange(g, device=dev)).flatten()
    out_f = full_attention(query.index_select(1, f_q), repeat_kv(key.index_select(1, f_kv), g),
                           repeat_kv(value.index_select(1, f_kv), g), attention_mask, scaling, dropout)
    out_s = sliding_attention(query.index_select(1, s_q), repeat_kv(key.index_select(1, s_kv), g),
                              repeat_kv(value.index_select(1, s_kv), g), attention_mask, scaling, window,
                              dropout, swa_backend, chunk, sink)
    # Scatter back: concatenated order is [F query heads, S query heads]; invert that permutation.
    inverse = torch.argsort(torch.cat([f_q, s_q]))
    return torch.cat([out_f, out_s], dim=1).index_select(1, inverse)
