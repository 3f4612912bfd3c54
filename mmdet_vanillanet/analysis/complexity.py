"""Parameters and FLOPs with mmengine's analysis tools (``FlopAnalyzer``, ``parameter_count``).

Convention (mmengine's, fvcore's): one multiply-add counts as one FLOP, i.e. the counts are MACs; convs,
linears, matmuls and norms are counted, pooling, activations and element-wise additions are not. mmdet's
``tools/analysis_tools/get_flops.py`` counts the same way, on the same ``mode='tensor'`` forward.

The VanillaNet paper's GFLOPs come from mmcv's older hook-based counter, which only sees ``nn.Conv2d``-like
modules: it misses the series activation's depthwise conv (a functional ``F.conv2d`` in the reference code,
as here) and Swin's attention matmuls. ``series_activation_flops`` gives the VanillaNet part, so that the
paper's convention can be reproduced: ``flops - series_activation_flops`` (fused structure).
"""
from functools import partial

import torch
from mmengine.analysis import FlopAnalyzer, parameter_count


def _count(model, inputs):
    from ..models.vanillanet import SeriesActivation

    analyzer = FlopAnalyzer(model, inputs)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    by_module = analyzer.by_module()
    series = sum(by_module.get(name, 0) for name, module in model.named_modules()
                 if isinstance(module, SeriesActivation))
    return dict(flops=int(analyzer.total()), params=int(parameter_count(model)['']),
                series_activation_flops=int(series))


@torch.no_grad()
def complexity(model, inputs):
    """Parameters and FLOPs (MACs) of ``model(*inputs)``.

    Args:
        model (nn.Module): e.g. a backbone, in eval mode.
        inputs (tuple | Tensor): its forward's inputs.

    Returns:
        dict: ``params`` (every parameter), ``flops`` (multiply-adds), ``series_activation_flops`` (the part
        in VanillaNet's series activations: their depthwise convs, and BNs in the training structure).
    """
    return _count(model, inputs if isinstance(inputs, tuple) else (inputs,))


@torch.no_grad()
def detector_complexity(model, inputs, data_samples):
    """Parameters and FLOPs (MACs) of a detector's ``mode='tensor'`` forward, as mmdet's ``get_flops.py``.

    Args:
        model (BaseDetector): in eval mode.
        inputs (Tensor): a preprocessed batch (N, 3, H, W).
        data_samples (list[DetDataSample]): their metainfo.

    Returns:
        dict: ``params``, ``flops``, ``series_activation_flops`` (as :func:`complexity`).
    """
    patched = 'forward' in vars(model)
    forward = model.forward
    model.forward = partial(forward, data_samples=data_samples, mode='tensor')
    try:
        return _count(model, (inputs,))
    finally:
        if patched:
            model.forward = forward
        else:
            del model.forward
