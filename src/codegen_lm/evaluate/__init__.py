"""Benchmarks: HumanEval pass@k and the Multi-Turn Programming Benchmark, executed in the sandbox."""

from .passk import mean_pass_at_k, pass_at_k

__all__ = ["mean_pass_at_k", "pass_at_k"]
