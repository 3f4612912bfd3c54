"""The project's compiled CPU kernels (``mmdet_vanillanet/csrc/``): loading them, where they run, the calls.

- ``depthwise_conv_nhwc``: the fused VanillaNet's series activation, ``F.conv2d(x, weight, bias, padding=K // 2,
  groups=C)`` on a channels-last bf16 or fp32 map with fp32 arithmetic, optionally of the block's 2x2 max pool
  taken on the way in; 1.6-2.3x faster than oneDNN's depthwise kernels in bf16 on an AMX Xeon. It needs AVX-512
  with AVX512_BF16 and K in 3 ... 13; elsewhere the fast path keeps oneDNN's kernel.
- ``quantized_depthwise_conv_nhwc``: the same conv between uint8 maps of PT2E's int8 backbone.
- ``channels_last_to_nchw``: the copy of a channels-last map to NCHW-contiguous memory, 5-7x faster than
  ``Tensor.contiguous()`` on these maps; any CPU.

``make install`` compiles them with the package. Without them (a hand-made install, a torch they were not built
against) the fast paths run as before, on oneDNN's depthwise kernel and torch's copy, after one warning.
"""
import functools
import pathlib
import warnings

import torch

KERNEL_SIZES = (3, 5, 7, 9, 11, 13)
_REBUILD = '`make install` (or `pip install --no-build-isolation -e .`)'
_WITHOUT = ("so the fused backbone's bf16 and int8 paths use oneDNN's slower depthwise conv and torch's slower "
            'layout copy')


def load_from(folder):
    """Load the compiled kernels built in ``folder``; False, with one warning, when none is there or it does not
    load into this torch (built against another one).

    Args:
        folder (str | Path): where ``_cpu_kernels*.so`` is.
    """
    built = sorted(pathlib.Path(folder).glob('_cpu_kernels*.so'))
    if not built:
        warnings.warn(f'VanillaNet: the compiled CPU kernels (_cpu_kernels*.so) are missing in {folder}, {_WITHOUT}; '
                      f'build them with {_REBUILD}.')
        return False
    try:
        torch.ops.load_library(str(built[0]))
    except OSError as error:  # built against another torch: undefined symbols
        warnings.warn(f'VanillaNet: the compiled CPU kernels {built[0]} do not load into this torch ({error}), '
                      f'{_WITHOUT}; rebuild them with {_REBUILD}.')
        return False
    return True


def _register_shapes():
    """What each op returns, for tracing (``torch.compile`` of the int8 backbone calls the quantized kernel)."""
    def depthwise_shape(x, weight, bias, pool=1):
        n, c, h, w = x.shape
        return torch.empty((n, c, h // pool, w // pool), dtype=x.dtype, memory_format=torch.channels_last)

    torch.library.register_fake('mmdet_vanillanet::depthwise_conv_nhwc')(depthwise_shape)
    torch.library.register_fake('mmdet_vanillanet::quantized_depthwise_conv_nhwc')(
        lambda x, *args: torch.empty_like(x, memory_format=torch.channels_last))
    torch.library.register_fake('mmdet_vanillanet::channels_last_to_nchw')(lambda x: torch.empty_like(
        x, memory_format=torch.contiguous_format))


@functools.lru_cache(maxsize=None)
def loaded():
    """Whether the package's compiled kernels are loaded into this process; loads them on the first call."""
    if not load_from(pathlib.Path(__file__).parents[1]):
        return False
    _register_shapes()
    return True


@functools.lru_cache(maxsize=None)
def _cpu_runs_depthwise():
    return bool(torch.ops.mmdet_vanillanet.depthwise_conv_nhwc_supported())


def depthwise_runs(kernel_size):
    """Whether the depthwise kernel runs a ``kernel_size`` x ``kernel_size`` conv on this machine."""
    return kernel_size in KERNEL_SIZES and loaded() and _cpu_runs_depthwise()


def depthwise_weights(weight, bias, dtype):
    """A depthwise conv's ``weight`` (C, 1, K, K) and ``bias`` (C,) in the kernel's layout, fp32 (K, K, C) and
    (C,), holding the values ``dtype`` gives them (bf16: the rounding autocast applies to a conv's parameters).

    Args:
        weight (Tensor): the conv weight.
        bias (Tensor): the conv bias.
        dtype (torch.dtype): the compute dtype whose rounding the values take.
    """
    channels, _, size, _ = weight.shape
    rounded = weight.detach().to(dtype).float().view(channels, size, size)
    return [rounded.permute(1, 2, 0).contiguous(), bias.detach().to(dtype).float().contiguous()]


def depthwise_conv(x, weight, bias, pool=1):
    """The depthwise conv of the channels-last map ``x`` (bf16 or fp32), or of its 2x2 max pool; same dtype and
    layout out.

    Args:
        x (Tensor): (N, C, H, W), channels-last contiguous.
        weight (Tensor): (K, K, C) fp32, as :func:`depthwise_weights` makes it.
        bias (Tensor): (C,) fp32.
        pool (int): 2: the conv of ``F.max_pool2d(x, 2)`` (NaNs propagate, odd sides floored), computed without
            the pooled map; 1: of ``x``. Default: 1.
    """
    return torch.ops.mmdet_vanillanet.depthwise_conv_nhwc(x, weight, bias, pool)


def quantized_depthwise_conv(x, x_zero_point, weight, bias, out_scale, out_zero_point):
    """The depthwise conv between uint8 maps quantized per tensor (PT2E's activations), in fp32 inside.

    Computes ``clamp(round(conv(x - x_zero_point) / out_scale) + out_zero_point, 0, 255)``.

    Args:
        x (Tensor): (N, C, H, W) uint8 (made channels-last if it is not).
        x_zero_point (int): the input's zero point.
        weight (Tensor): (K, K, C) fp32: the dequantized weights times the input's scale.
        bias (Tensor): (C,) fp32.
        out_scale (float): the output's scale.
        out_zero_point (int): the output's zero point.
    """
    return torch.ops.mmdet_vanillanet.quantized_depthwise_conv_nhwc(x, x_zero_point, weight, bias, out_scale,
                                                                     out_zero_point)


def contiguous(x):
    """``x.contiguous()``, through the blocked copy where ``x`` is a channels-last CPU map of 2- or 4-byte
    elements (what the fused backbone's bf16 path returns).

    Args:
        x (Tensor): any tensor.
    """
    if (x.dim() == 4 and x.device.type == 'cpu' and x.element_size() in (2, 4) and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last) and not x.requires_grad and loaded()):
        return torch.ops.mmdet_vanillanet.channels_last_to_nchw(x)
    return x.contiguous()
