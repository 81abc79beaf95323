"""Allocation files: format, rule-based generators, statistics, KV estimator, heatmap."""

from .format import FORMAT_VERSION, Allocation, AllocationError, atomic_write_text
from .memory import KVEstimate, estimate_kv
from .rules import RULES, make_allocation
from .shape import ModelShape
from .stats import render_text, summarize

__all__ = [
    "FORMAT_VERSION", "Allocation", "AllocationError", "atomic_write_text", "KVEstimate", "estimate_kv",
    "RULES", "make_allocation", "ModelShape", "render_text", "summarize",
]

from .plot import plot_allocation  # noqa: E402  (matplotlib is imported lazily inside)

__all__ += ["plot_allocation"]
