"""Measure before you plan: training throughput, memory and MFU (`tunesmith bench`)."""
from .lengths import bench_lengths, format_lengths, run_lengths
from .throughput import BenchResult, bench, format_bench, matmul_peak, run_bench

__all__ = ["BenchResult", "bench", "bench_lengths", "format_bench", "format_lengths", "matmul_peak", "run_bench",
           "run_lengths"]
