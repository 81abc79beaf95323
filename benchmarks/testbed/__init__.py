"""Reproducible testbed: learned (ConSA) vs rule-based allocations on a small model trained here.

Run ``python -m benchmarks.testbed.run --help``; see ``benchmarks/testbed/README.md``.
"""
