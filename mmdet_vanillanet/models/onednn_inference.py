"""The fused VanillaNet's CPU inference fast path on oneDNN tensors, and the probe that decides whether to use it.

The fast path calls ``torch.ops.mkldnn._convolution_pointwise``, a private op of PyTorch's oneDNN
integration (the one ``torch.compile``'s CPU backend lowers convolutions to). A private op can change or
disappear between torch builds, so :func:`fast_path_works` runs it once per process on a small fused block
against the plain PyTorch ops: a changed signature or a wrong result turns the fast path off for the
process, with one warning. Errors at inference time are never swallowed.
"""
import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv(x, conv, relu=False):
    """``conv`` (a Conv2d) on a oneDNN tensor, with its ReLU as a fused post-op when ``relu``."""
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, list(conv.padding),
                                                   list(conv.stride), list(conv.dilation), conv.groups,
                                                   'relu' if relu else 'none', [None], None)


def _depthwise(x, act):
    """The deploy-form series activation's depthwise conv (its ReLU already applied) on a oneDNN tensor."""
    return torch.ops.mkldnn._convolution_pointwise(x, act.weight, act.bias, [act.act_num, act.act_num], [1, 1],
                                                   [1, 1], act.channels, 'none', [None], None)


def _max_pool(x, size):
    return torch.mkldnn_max_pool2d(x, [size, size], [size, size])


def fused_forward(net, x):
    """The fused VanillaNet ``net`` on ``x`` through oneDNN's blocked layout (nChw16c); outputs NCHW-contiguous.

    The same operations as the plain path, with the ReLU of every series activation moved before the max
    pool (max and ReLU commute exactly) so that it runs as a post-op of the conv before it.

    Args:
        net (VanillaNet): a deploy-structure VanillaNet without ada-pool blocks.
        x (Tensor): fp32 CPU images (N, C, H, W).
    """
    x = x.contiguous().to_mkldnn()
    x = _depthwise(_conv(x, net.stem[0], relu=True), net.stem[1])
    outs = []
    for i, block in enumerate(net.stages):
        x = _conv(x, block.conv, relu=True)
        if isinstance(block.pool, nn.MaxPool2d):
            x = _max_pool(x, int(block.pool.kernel_size))
        x = _depthwise(x, block.act)
        if i in net.out_indices:
            outs.append(x.to_dense())
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
def fast_path_works():
    """Whether this torch build runs the fast path's ops and gets the plain ops' results; probed once.

    Returns False, with one warning, when the ops are missing, take other arguments or compute something
    else (a fused block, 1x1 conv + ReLU + 2x2 max pool + depthwise conv, on a 3x16x16x20 input, within
    1e-4 relative).
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch, 'mkldnn_max_pool2d')
            and hasattr(torch.ops.mkldnn, '_convolution_pointwise')):
        return False
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.utils.skip_init(nn.Conv2d, 16, 24, 1)  # the weights come from the local generator
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
    act = _ProbeActivation(24, 2, generator)
    x = torch.randn(3, 16, 16, 20, generator=generator)
    try:
        with torch.no_grad():
            fast = _depthwise(_max_pool(_conv(x.to_mkldnn(), conv, relu=True), 2), act).to_dense()
            plain = F.conv2d(F.relu(F.max_pool2d(conv(x), 2)), act.weight, act.bias, padding=2, groups=24)
    except (RuntimeError, TypeError, NotImplementedError) as error:
        warnings.warn(f'VanillaNet: the oneDNN fast path is off in this process: its ops failed ({error}).')
        return False
    deviation = float((fast - plain).abs().max() / plain.abs().max())
    if fast.shape != plain.shape or not deviation < 1e-4:
        warnings.warn(f'VanillaNet: the oneDNN fast path is off in this process: its ops compute something else '
                      f'than the plain ones (relative deviation {deviation:.2g}).')
        return False
    return True


def has_forward_hooks(module):
    """Whether a forward (pre-)hook is registered on a submodule of ``module`` or globally.

    The fast path does not call the submodules, so their hooks would not fire.
    """
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules() if m is not module)
