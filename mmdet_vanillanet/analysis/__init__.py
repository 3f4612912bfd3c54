"""Measuring VanillaNet: parameters and FLOPs, latency, the GEMM roofline, training cost, the benchmark table.

Not imported by ``import mmdet_vanillanet`` (nothing here registers anything); ``tools/benchmark.py`` is
the front door.
"""
from .complexity import complexity, detector_complexity
from .latency import Timing, synchronize, time_call, time_interleaved
from .roofline import achieved_gflops, gemm_bound_seconds, gemm_throughput

__all__ = ['complexity', 'detector_complexity', 'Timing', 'synchronize', 'time_call', 'time_interleaved',
           'achieved_gflops', 'gemm_bound_seconds', 'gemm_throughput']
