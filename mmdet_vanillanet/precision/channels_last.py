"""Whole detectors in channels-last memory format for bf16 inference, with NCHW maps wherever mmcv's ops read them.

Under CPU bf16 autocast oneDNN runs the 3x3 convs of FPN and the heads about twice as fast on channels-last maps
as on NCHW ones, and a conv with channels-last weights returns channels-last maps, so converting the weights
carries the layout from the backbone to the heads. mmcv 2.1.0's RoIAlign and deformable convs read their
input's memory as NCHW without looking at its strides (docs/layout.md): every module of ``mmcv.ops`` gets its
4-D inputs NCHW-contiguous, and the convs inside such modules keep their NCHW weights (their offsets feed the
op directly). The VanillaNets inside hand their channels-last bf16 maps on without the copy to NCHW.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn
from mmengine.model import is_model_wrapper

from ..detectors import find_vanillanets
from .nested import map_tensors


def is_mmcv_op(module):
    """Whether ``module`` is one of mmcv's ops (its class is defined in ``mmcv.ops``)."""
    return type(module).__module__.startswith('mmcv.ops')


def _nchw(tensor):
    return tensor.contiguous() if tensor.dim() == 4 else tensor


def to_nchw(value):
    """``value`` with every 4-D tensor inside (nested tuples, lists, dicts) NCHW-contiguous."""
    return map_tensors(_nchw, value)


def _inputs_to_nchw(module, args, kwargs):
    return to_nchw(args), to_nchw(kwargs)


def _convs_to_convert(model):
    """The 2-d convs of ``model`` outside its VanillaNets and outside mmcv's ops, whose weights are NCHW."""
    kept = {id(m) for owner in model.modules() if is_mmcv_op(owner) for m in owner.modules()}
    kept |= {id(m) for net in find_vanillanets(model) for m in net.modules()}
    return [m for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and id(m) not in kept
            and m.weight.dim() == 4 and not m.weight.is_contiguous(memory_format=torch.channels_last)]


@contextmanager
def channels_last_detector(model):
    """Inside the block, ``model``'s necks and heads run in channels-last; the layout is restored after.

    Converts the conv weights outside the VanillaNets and mmcv's ops to channels-last, lets the VanillaNets
    return channels-last bf16 maps, and hooks every mmcv op to receive NCHW-contiguous inputs. On exit the
    weights are NCHW-contiguous again (with whatever values they have then), the flags and hooks as before.

    Args:
        model (nn.Module): a detector (a model wrapper is unwrapped).
    """
    if is_model_wrapper(model):
        model = model.module
    convs = _convs_to_convert(model)
    nets = [net for net in find_vanillanets(model) if not net.channels_last_outputs]
    handles = [m.register_forward_pre_hook(_inputs_to_nchw, with_kwargs=True)
               for m in model.modules() if is_mmcv_op(m)]
    try:
        for conv in convs:
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        for net in nets:
            net.channels_last_outputs = True
        yield model
    finally:
        for conv in convs:
            conv.weight.data = conv.weight.data.contiguous()
        for net in nets:
            net.channels_last_outputs = False
        for handle in handles:
            handle.remove()
