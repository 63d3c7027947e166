"""Measure before you plan: training throughput, memory and MFU (`tunesmith bench`)."""
from .throughput import BenchResult, bench, format_bench, matmul_peak

__all__ = ["BenchResult", "bench", "format_bench", "matmul_peak"]
