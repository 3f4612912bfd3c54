"""The GEMM roofline: this machine's measured matrix-multiply throughput, and a model's share of it.

VanillaNet's fused blocks are 1x1 convs (GEMMs) plus depthwise convs, so ``2 x MACs / GEMM FLOP/s`` is
the time the network would take if every multiply-add ran at the speed of a large ``torch.mm``: a
practical lower bound for this hardware and this BLAS.
"""
import torch

from .latency import time_call


def gemm_inputs(size=4096, device='cpu', dtype=torch.float32, seed=0):
    """Two random ``size x size`` matrices and an output buffer for :func:`gemm_throughput`."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(size, size, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    return a, b, torch.empty(size, size, device=device, dtype=dtype)


def onednn_gemm_call(size=4096, device='cpu', seed=0):
    """The same multiply as :func:`gemm_inputs` (``size`` x ``size`` by ``size`` x ``size``) as a 1x1 conv.

    On CPU it runs on a oneDNN tensor in the blocked layout, with the kernel the fused backbone's 1x1
    convs use (``mkldnn._convolution_pointwise``); elsewhere as ``F.conv2d`` in channels-last. ``size``
    pixels, ``size`` input and output channels: ``size^3`` multiply-adds.

    Returns:
        callable: one multiply per call.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, size, 1, size, generator=generator)
    weight = torch.randn(size, size, 1, 1, generator=generator)
    if torch.device(device).type == 'cpu' and torch.backends.mkldnn.is_available():
        x = x.to_mkldnn()
        return lambda: torch.ops.mkldnn._convolution_pointwise(x, weight, None, [0, 0], [1, 1], [1, 1], 1, 'none',
                                                               [None], None)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    weight = weight.to(device)
    return lambda: torch.nn.functional.conv2d(x, weight)


def gemm_flops(size):
    """Floating-point operations of one ``size^3`` matrix multiply (a multiply-add counts 2)."""
    return 2 * size ** 3


def gemm_throughput(size=4096, device='cpu', dtype=torch.float32, warmup=1, repeats=5):
    """Measured GEMM throughput: ``torch.mm`` of two ``size x size`` matrices (all threads torch uses).

    Args:
        size (int): matrix side. Default: 4096 (0.14 TFLOP per call).
        device (str | torch.device): Default: 'cpu'.
        dtype (torch.dtype): Default: float32.
        warmup (int): untimed calls. Default: 1.
        repeats (int): timed calls. Default: 5.

    Returns:
        dict: ``gflops`` (from the median time), ``timing`` (:class:`~.latency.Timing`), ``size``.
    """
    a, b, out = gemm_inputs(size, device, dtype)
    timing = time_call(lambda: torch.mm(a, b, out=out), warmup, repeats, device)
    return dict(gflops=gemm_flops(size) / timing.median / 1e9, timing=timing, size=size)


def gemm_bound_seconds(macs, gflops):
    """Seconds ``macs`` multiply-adds take at ``gflops`` GFLOP/s (2 FLOPs per multiply-add)."""
    return 2 * macs / (gflops * 1e9)


def achieved_gflops(macs, seconds):
    """GFLOP/s a model of ``macs`` multiply-adds achieves when a forward takes ``seconds``."""
    return 2 * macs / seconds / 1e9
