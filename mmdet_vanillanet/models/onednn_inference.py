"""The fused VanillaNet's CPU inference fast path through oneDNN's convolutions (fp32 on its blocked layout, bf16
on channels-last tensors, where the series activations run on the project's depthwise kernel,
:mod:`.cpu_kernels`, wherever it runs), and the probe that decides whether this torch build can run it.

The fast path calls ``torch.ops.mkldnn._convolution_pointwise``, a private op of PyTorch's oneDNN
integration (the one ``torch.compile``'s CPU backend lowers convolutions to). A private op can change or
disappear between torch builds, so :func:`fast_path_works` runs it once per process and dtype on a small
fused block against the plain PyTorch ops: a changed signature or a wrong result turns the fast path off for
the process, with one warning. Errors at inference time are never swallowed.
"""
import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels

# largest relative deviation of the probe block from the plain fp32 ops: float rounding, bf16 rounding
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _conv(x, weight, bias, conv, relu=False):
    """``conv``'s geometry (a Conv2d) with ``weight`` / ``bias``, on a oneDNN or channels-last tensor; ReLU as
    a post-op."""
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(conv.padding), list(conv.stride),
                                                   list(conv.dilation), conv.groups, 'relu' if relu else 'none',
                                                   [None], None)


def _pointwise_rows(x, weight, bias, relu=False):
    """A 1x1 conv (stride 1) of a channels-last map as one matrix product over its pixels, ReLU as a post-op:
    oneDNN's matmul runs VanillaNet's wide 1x1 convs 1.1-1.8x faster in bf16 than its conv kernel does."""
    n, channels, height, width = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * height * width, channels)  # a view of the channels-last memory
    out = torch.ops.mkldnn._linear_pointwise(rows, weight.view(weight.shape[0], channels), bias,
                                             'relu' if relu else 'none', [None], '')
    return out.view(n, height, width, -1).permute(0, 3, 1, 2)


def _depthwise(x, weight, bias, act):
    """The deploy-form series activation's depthwise conv (its ReLU already applied) on a oneDNN tensor."""
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [act.act_num, act.act_num], [1, 1], [1, 1],
                                                   act.channels, 'none', [None], None)


def _modules_in_call_order(net):
    """The fused convs and activations in call order: stem conv, stem activation, then conv and act of each block."""
    modules = [net.stem[0], net.stem[1]]
    for block in net.stages:
        modules += [block.conv, block.act]
    return modules


def _uses_kernel(dtype, act):
    """Whether the series activation ``act`` runs on the project's depthwise kernel in ``dtype``."""
    return LAYOUTS[dtype] is _ChannelsLast and cpu_kernels.depthwise_runs(2 * act.act_num + 1)


def weights_in(net, dtype):
    """``net``'s fused weights and biases in call order, as the fast path in ``dtype`` reads them, converted once
    and kept until a parameter changes.

    fp32 returns the parameters themselves. In bf16 the values are rounded to bf16, and the series
    activations that run on the project's depthwise kernel get its layout (:func:`cpu_kernels.depthwise_weights`).
    The conversions are cached on ``net`` (outside its state dict), keyed by each parameter's storage and version
    counter, so an in-place update (``load_state_dict``, an optimizer step) or a replaced parameter converts them
    again.

    Args:
        net (VanillaNet): a deploy-structure VanillaNet.
        dtype (torch.dtype): the compute dtype.
    """
    modules = _modules_in_call_order(net)
    params = [tensor for module in modules for tensor in (module.weight, module.bias)]
    if dtype == torch.float32:
        return params
    kernel = tuple(hasattr(module, 'act_num') and _uses_kernel(dtype, module) for module in modules)
    key = (dtype, kernel, tuple((p.data_ptr(), p._version) for p in params))
    cache = net.__dict__.get('_onednn_weights')
    if cache is None or cache[0] != key:
        with torch.no_grad():
            converted = []
            for module, on_kernel in zip(modules, kernel):
                if on_kernel:
                    converted += cpu_kernels.depthwise_weights(module.weight, module.bias, dtype)
                else:
                    converted += [p.detach().to(dtype).contiguous() for p in (module.weight, module.bias)]
        cache = (key, converted)
        net.__dict__['_onednn_weights'] = cache
    return cache[1]


def channels_last_max_pool(x, size):
    """``F.max_pool2d(x, size)`` of a channels-last ``x`` as element-wise maxima of whole rows, then of pixels.

    The same values (NaNs included), 2-4x faster on channels-last maps than the pooling kernel, which runs at a
    few GB/s there. Falls back to ``F.max_pool2d`` when ``x`` is not channels-last or a side is not a multiple
    of ``size``.

    Args:
        x (Tensor): (N, C, H, W), channels-last.
        size (int): kernel size and stride.
    """
    n, c, h, w = x.shape
    if h % size or w % size or not x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, size)
    rows = x.permute(0, 2, 3, 1).view(n, h // size, size, w // size * size * c)  # the NHWC memory
    pixels = functools.reduce(torch.maximum, rows.unbind(2)).view(n, h // size, w // size, size, c)
    return functools.reduce(torch.maximum, pixels.unbind(3)).permute(0, 3, 1, 2)


class _Blocked:
    """oneDNN's own blocked layout (nChw16c): fp32's fastest, where the direct depthwise kernel runs."""

    @staticmethod
    def enter(x):
        return x.contiguous().to_mkldnn()

    @staticmethod
    def leave(x):
        return x.to_dense()

    @staticmethod
    def max_pool(x, size):
        return torch.mkldnn_max_pool2d(x, [size, size], [size, size])

    @staticmethod
    def pointwise(x, weight, bias, conv, relu):
        return _conv(x, weight, bias, conv, relu)

    @staticmethod
    def pool_depthwise(x, pool, weight, bias, act):
        """The series activation ``act`` of ``x``, max-pooled first by ``pool`` (an int, or None for none)."""
        if pool:
            x = _Blocked.max_pool(x, pool)
        return _depthwise(x, weight, bias, act)


class _ChannelsLast:
    """Dense channels-last (NHWC) tensors: bf16's fastest, where AMX runs the 1x1 convs (as matrix products over
    the pixels) and the project's kernel (:mod:`.cpu_kernels`; oneDNN's where it does not run) the depthwise
    ones, with no reorder in between (on the blocked layout bf16 reorders around every conv)."""

    @staticmethod
    def enter(x):
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def leave(x):
        return cpu_kernels.contiguous(x)

    @staticmethod
    def max_pool(x, size):
        return channels_last_max_pool(x, size)

    @staticmethod
    def pointwise(x, weight, bias, conv, relu):
        return _pointwise_rows(x, weight, bias, relu)

    @staticmethod
    def pool_depthwise(x, pool, weight, bias, act):
        """The series activation ``act`` of ``x``, max-pooled first by ``pool`` (an int, or None for none); the
        project's kernel takes a 2x2 pool's maxima as it reads its input."""
        if _uses_kernel(x.dtype, act):
            if pool not in (None, 2):  # a custom arch's wider pool
                x, pool = _ChannelsLast.max_pool(x, pool), None
            return cpu_kernels.depthwise_conv(x, weight, bias, pool or 1)
        if pool:
            x = _ChannelsLast.max_pool(x, pool)
        return _depthwise(x, weight, bias, act)


LAYOUTS = {torch.float32: _Blocked, torch.bfloat16: _ChannelsLast}


def fused_forward(net, x, dtype=torch.float32, channels_last_outputs=False):
    """The fused VanillaNet ``net`` on ``x`` through oneDNN's convolutions; outputs NCHW-contiguous.

    The same operations as the plain path, with the ReLU of every series activation moved before the max
    pool (max and ReLU commute exactly) so that it runs as a post-op of the conv before it, and each dtype
    in its fastest layout (:data:`LAYOUTS`).

    Args:
        net (VanillaNet): a deploy-structure VanillaNet without ada-pool blocks.
        x (Tensor): CPU images (N, C, H, W), fp32 or ``dtype``.
        dtype (torch.dtype): compute dtype, ``torch.float32`` or ``torch.bfloat16``; the outputs have it.
        channels_last_outputs (bool): bf16 only: return the channels-last maps as they are, without the copy
            to NCHW (for consumers that take either layout). Default: False.
    """
    layout = LAYOUTS[dtype]
    leave = (lambda out: out) if channels_last_outputs and layout is _ChannelsLast else layout.leave
    weights = iter(weights_in(net, dtype))
    x = layout.enter(x.to(dtype))
    x = _conv(x, next(weights), next(weights), net.stem[0], relu=True)
    x = layout.pool_depthwise(x, None, next(weights), next(weights), net.stem[1])
    outs = []
    for i, block in enumerate(net.stages):
        x = layout.pointwise(x, next(weights), next(weights), block.conv, relu=True)
        pool = int(block.pool.kernel_size) if isinstance(block.pool, nn.MaxPool2d) else None
        x = layout.pool_depthwise(x, pool, next(weights), next(weights), block.act)
        if i in net.out_indices:
            outs.append(leave(x))
    return tuple(outs)


class _ProbeActivation(nn.Module):
    """The deploy-form series activation's parameters, as :func:`_depthwise` reads them."""

    def __init__(self, channels, act_num, generator):
        super().__init__()
        size = 2 * act_num + 1
        self.channels, self.act_num = channels, act_num
        self.weight = nn.Parameter(torch.randn(channels, 1, size, size, generator=generator) * 0.2)
        self.bias = nn.Parameter(torch.randn(channels, generator=generator) * 0.1)


@functools.lru_cache(maxsize=None)
def fast_path_works(dtype):
    """Whether this torch build runs the fast path's ops in ``dtype`` and gets the plain ops' results; probed
    once per dtype.

    Returns False, with one warning, when the ops are missing, take other arguments or compute something
    else (a fused block, 1x1 conv + ReLU + 2x2 max pool + depthwise conv, on a 3x16x16x20 input, within
    :data:`PROBE_TOLERANCE` of the plain fp32 ops).

    Args:
        dtype (torch.dtype): ``torch.float32`` or ``torch.bfloat16``.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch, 'mkldnn_max_pool2d')
            and hasattr(torch.ops.mkldnn, '_convolution_pointwise') and hasattr(torch.ops.mkldnn, '_linear_pointwise')):
        return False
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.utils.skip_init(nn.Conv2d, 16, 24, 1)  # the weights come from the local generator
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
    act = _ProbeActivation(24, 2, generator)
    x = torch.randn(3, 16, 16, 20, generator=generator)
    conv_w, conv_b, act_w, act_b = (t.detach().to(dtype) for t in (conv.weight, conv.bias, act.weight, act.bias))
    try:
        with torch.no_grad():
            layout = LAYOUTS[dtype]
            fast = layout.pointwise(layout.enter(x.to(dtype)), conv_w, conv_b, conv, relu=True)
            fast = layout.leave(_depthwise(layout.max_pool(fast, 2), act_w, act_b, act)).float()
            plain = F.conv2d(F.relu(F.max_pool2d(conv(x), 2)), act.weight, act.bias, padding=2, groups=24)
    except (RuntimeError, TypeError, NotImplementedError) as error:
        warnings.warn(f'VanillaNet: the oneDNN fast path is off in this process: its ops failed in {dtype} ({error}).')
        return False
    deviation = float((fast - plain).abs().max() / plain.abs().max())
    if fast.shape != plain.shape or not deviation < PROBE_TOLERANCE[dtype]:
        warnings.warn(f'VanillaNet: the oneDNN fast path is off in this process: its ops compute something '
                      f'else in {dtype} than the plain ones (relative deviation {deviation:.2g}).')
        return False
    return True


def has_forward_hooks(module):
    """Whether a forward (pre-)hook is registered on a submodule of ``module`` or globally.

    The fast path does not call the submodules, so their hooks would not fire.
    """
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules() if m is not module)
