"""Latency: warm-up calls, then the median of N timed calls; CUDA work is synchronised before each clock read."""
import statistics
import time
from dataclasses import dataclass, field

import torch


def synchronize(device):
    """Wait for the device's queued work (a no-op on CPU).

    Args:
        device (str | torch.device): the device the timed work runs on.
    """
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call: ``median``, ``min``, ``max`` over ``times`` (every timed call)."""

    times: list = field(default_factory=list)

    @property
    def median(self):
        return statistics.median(self.times)

    @property
    def min(self):
        return min(self.times)

    @property
    def max(self):
        return max(self.times)


def _timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_call(fn, warmup=1, repeats=5, device='cpu'):
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Args:
        fn (callable): the work; called without arguments.
        warmup (int): untimed calls first (allocations, oneDNN primitive creation, packing). Default: 1.
        repeats (int): timed calls. Default: 5.
        device (str | torch.device): synchronised around every timed call. Default: 'cpu'.

    Returns:
        Timing
    """
    for _ in range(warmup):
        fn()
    return Timing([_timed(fn, device) for _ in range(repeats)])


def time_interleaved(fns, warmup=1, repeats=5, device='cpu'):
    """Time several calls round-robin: one call of each per round, ``repeats`` rounds.

    On a shared machine the load drifts; interleaving lets a drift hit every row alike, so that the ratios
    between rows stay meaningful even when the absolute times move.

    Args:
        fns (dict[str, callable]): name -> work.
        warmup (int): untimed calls of each first. Default: 1.
        repeats (int): rounds. Default: 5.
        device (str | torch.device): synchronised around every timed call. Default: 'cpu'.

    Returns:
        dict[str, Timing]: in the order of ``fns``.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    timings = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            timings[name].times.append(_timed(fn, device))
    return timings
