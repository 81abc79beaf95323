"""Pydantic models of the ``/v1/consa/allocation`` response."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Pool = Literal["full", "sliding", "other"]


class KVEstimateInfo(BaseModel):
    """:func:`consa_vllm.allocation.estimate_kv` at the served ``max_model_len``."""

    context: int = Field(description="tokens per sequence: the served max_model_len")
    dtype: str = Field(description="KV-cache element type the estimate assumes")
    block_size_full: int | None = Field(description="tokens per block of the F pool (None: counted in tokens)")
    block_size_sliding: int | None = Field(description="tokens per block of the S pool (None: counted in tokens)")
    bytes_per_sequence: int
    dense_bytes_per_sequence: int = Field(description="the same model with every head full attention")
    ratio_to_dense: float
    capacity_gain: float = Field(description="how many more sequences of this length fit in the same KV memory")


class PoolBlocks(BaseModel):
    """KV blocks held now by one pool (all KV-cache groups of that kind)."""

    pool: Pool
    block_size: int = Field(description="tokens per block")
    blocks_in_use: int = Field(description="blocks referenced by live requests (shared prefix blocks once)")
    num_groups: int
    num_layers: int = Field(description="attention modules whose KV lives in this pool")
    bytes_in_use: int = Field(description="KV bytes of the blocks in use, in the cache dtype (all its layers)")


class KVBlocks(BaseModel):
    """The engine's block pool, read through an engine-core utility call."""

    num_blocks: int = Field(description="usable blocks of the one block pool the F and S pools share")
    free_blocks: int = Field(description="free blocks, including evictable prefix-cache blocks")
    num_requests: int = Field(description="requests the scheduler holds (running, waiting, preempted)")
    pools: list[PoolBlocks]


class AllocationInfo(BaseModel):
    """What ``GET /v1/consa/allocation`` returns."""

    model: str = Field(description="served model name")
    max_model_len: int
    allocation: dict[str, Any] = Field(description="the served allocation (config.json 'consa'), extra fields kept")
    granularity: Literal["layer", "kv_head"]
    window: int
    sparsity: float = Field(description="achieved fraction of S units")
    target_sparsity: float | None = Field(None, description="the trainer's target, when the allocation records it")
    num_layers: int
    num_kv_heads: int
    full_heads_per_layer: list[int]
    full_kv_heads: int
    sliding_kv_heads: int
    kv_estimate: KVEstimateInfo
    kv_blocks: KVBlocks | None = Field(None, description="blocks in use now; None if the engine could not be asked")
