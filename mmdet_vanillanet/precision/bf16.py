"""bf16 inference of whole detectors on a CPU: the network under autocast, what follows it in fp32.

Under ``torch.autocast('cpu', dtype=torch.bfloat16)`` (what mmengine's ``TestLoop(fp16=True)`` and
``ValLoop(fp16=True)`` do on a CPU) convs and linear layers return bf16, but mmcv 2.1.0's CPU kernels of NMS
and RoIAlign take fp32 only ("expected scalar type Float but found BFloat16"). Without patching mmdet or
mmcv, forward hooks put fp32 borders where a detector's tensors reach such code:

- the raw outputs of every prediction head (a module with ``predict_by_feat``: dense heads, RPN, RoI box and
  mask heads, DETR heads) become fp32, so box decoding, NMS and mask pasting see fp32;
- every RoI extractor (RoIAlign) and every mmcv deformable conv (whose CPU kernels are fp32-only; the
  ``*Pack`` variants would cast their input to their offsets' bf16) runs whole in fp32, autocast off.
"""
from contextlib import ExitStack, contextmanager

import torch
from mmcv import ops as mmcv_ops
from mmengine.model import is_model_wrapper

from mmdet.models.roi_heads.roi_extractors import BaseRoIExtractor

from .. import cpu_support
from .channels_last import channels_last_detector
from .nested import map_tensors

# modules whose mmcv 2.1.0 CPU kernels take fp32 only
FP32_MODULES = (BaseRoIExtractor, mmcv_ops.DeformConv2d, mmcv_ops.ModulatedDeformConv2d)


def _fp32(tensor):
    return tensor.float() if tensor.is_floating_point() and tensor.dtype != torch.float32 else tensor


def to_fp32(value):
    """``value`` with every reduced-precision floating tensor inside (nested tuples, lists, dicts) in fp32."""
    return map_tensors(_fp32, value)


def _outputs_to_fp32(module, args, output):
    return to_fp32(output)


def _fp32_island(module):
    """Hooks that run ``module`` whole in fp32: inputs cast, autocast off until it returns (or raises)."""
    scopes = []

    def enter(module, args, kwargs):
        scope = torch.autocast('cpu', enabled=False)
        scope.__enter__()
        scopes.append(scope)
        return to_fp32(args), to_fp32(kwargs)

    def leave(module, args, output):
        scopes.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter, with_kwargs=True),
            module.register_forward_hook(leave, always_call=True)]


def is_prediction_head(module):
    """Whether ``module`` is a head whose raw outputs mmdet decodes (it defines ``predict_by_feat``)."""
    return callable(getattr(type(module), 'predict_by_feat', None))


def add_fp32_borders(model):
    """Register the fp32 casts on ``model``'s heads and RoI extractors; returns the hook handles.

    Args:
        model (nn.Module): a detector (a model wrapper is unwrapped).
    """
    if is_model_wrapper(model):
        model = model.module
    handles = []
    for module in model.modules():
        if is_prediction_head(module):
            handles.append(module.register_forward_hook(_outputs_to_fp32))
        if isinstance(module, FP32_MODULES):
            handles += _fp32_island(module)
    return handles


def bf16_available(allow_emulated=False, what='bf16 inference'):
    """Whether bf16 should run here: native bf16, or emulated when ``allow_emulated``; says so once when not.

    Args:
        allow_emulated (bool): run bf16 on a CPU without native support (correct but slow; for tests).
        what (str): what is asked for, in the message.
    """
    if cpu_support.native_bf16() or allow_emulated:
        return True
    cpu_support.warn_once(f'{what}: no native bf16 on this CPU ({cpu_support.describe()}); running fp32 instead of '
                          'emulating bf16, which is slower than fp32.')
    return False


def runs_on_cpu(model):
    """Whether ``model``'s parameters are on the CPU (a model without parameters counts as on the CPU)."""
    return all(p.device.type == 'cpu' for p in model.parameters())


@contextmanager
def bf16_inference(model, allow_emulated=False, channels_last=True):
    """Run ``model`` (a detector) in bf16 inside the block: CPU autocast, fp32 post-processing.

    VanillaNets inside take their oneDNN bf16 path. On a CPU without native bf16 the block runs fp32 and
    says so once, unless ``allow_emulated``. With ``channels_last`` the necks and heads run in channels-last
    memory format, with NCHW maps wherever mmcv's ops read them (:mod:`.channels_last`); the weights are
    NCHW again after the block.

    Args:
        model (nn.Module): the detector on the CPU, e.g. ``DetInferencer(...).model``.
        allow_emulated (bool): use bf16 even without native support. Default: False.
        channels_last (bool): run the necks and heads channels-last. Default: True.

    Example:
        >>> with bf16_inference(inferencer.model):  # doctest: +SKIP
        ...     result = inferencer('demo.jpg')
    """
    if not bf16_available(allow_emulated):
        yield model
        return
    with ExitStack() as stack:
        if channels_last and runs_on_cpu(model):
            stack.enter_context(channels_last_detector(model))  # before autocast caches bf16 weights
        for handle in add_fp32_borders(model):
            stack.callback(handle.remove)
        stack.enter_context(torch.autocast('cpu', dtype=torch.bfloat16))
        yield model
