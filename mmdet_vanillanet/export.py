"""ONNX export of the fused VanillaNet backbone, and of a single-stage detector's tensor outputs.

Uses torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): the dynamo-based
exporter, torch's default since 2.9, needs the ``onnxscript`` package, which this project does not
install. The backbone exports with dynamic batch, height and width. Every export is checked: ONNX
Runtime (CPU) on the same inputs must reproduce PyTorch's outputs.

Mask R-CNN (two-stage) detectors are not exported: their ``mode='tensor'`` forward selects proposals
with NMS and pools them with RoIAlign, mmcv ops without ONNX symbolics outside MMDeploy.
"""
import os
import os.path as osp
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config

from mmdet.models.detectors import SingleStageDetector

from .deploy import load_detector_checkpoint
from .detectors import build_detector, fuse_vanillanets, quiet_mmengine
from .models import VanillaNet
from .output_comparison import DeviationMessages, check_deviation, flatten_tensors, padded_shape

DEFAULT_OPSET = 17
ONNX_CHECK_MESSAGES = DeviationMessages(
    non_finite='The exported graph cannot be checked: {error}',
    other_outputs='ONNX Runtime returned other outputs than PyTorch: {error}',
    too_far='ONNX Runtime deviates from PyTorch by {max_rel:.3g} (relative), more than {tolerance:g}.')


class ONNXExportError(RuntimeError):
    """The model cannot be exported, or ONNX Runtime does not reproduce PyTorch's outputs."""


class DetectorTensorOutputs(nn.Module):
    """A single-stage detector's ``mode='tensor'`` forward (backbone, neck, head), outputs flattened.

    Returns the head's raw maps level by level: every classification map, then every box map
    (RetinaNet: ``cls_score_P3 ... cls_score_P7, bbox_pred_P3 ... bbox_pred_P7``). Decoding and NMS stay
    outside, as in mmdet's own tensor mode.
    """

    def __init__(self, detector):
        super().__init__()
        if not isinstance(detector, SingleStageDetector):
            raise ONNXExportError(
                f'Only single-stage detectors export without extra dependencies; {type(detector).__name__} '
                'selects proposals with NMS and pools them with RoIAlign (mmcv ops without ONNX symbolics): '
                'export its backbone, or use MMDeploy.')
        self.detector = detector

    def forward(self, inputs):
        return tuple(flatten_tensors(self.detector._forward(inputs)))


def _fused_backbone(model):
    if not isinstance(model, VanillaNet):
        raise TypeError(f'Expected a VanillaNet, got {type(model).__name__}.')
    if not model.deploy:
        raise ONNXExportError('Export the fused structure: call backbone.switch_to_deploy() first, or build it '
                              'with deploy=True (tools/deploy.py writes such configs).')
    return model


def _example_input(shape, device):
    """A random input of ``shape`` for tracing, from a local generator (the global random state is untouched)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)


def export_onnx(model, path, example, input_names, output_names, dynamic_axes=None, opset=DEFAULT_OPSET):
    """``torch.onnx.export`` (TorchScript exporter) of ``model(example)`` in eval mode, without gradients.

    Args:
        model (nn.Module): the module to export.
        path (str): the ``.onnx`` file to write (folders created).
        example (Tensor): an input of the intended shape.
        input_names (list[str]), output_names (list[str]): graph names.
        dynamic_axes (dict | None): as ``torch.onnx.export``.
        opset (int): ONNX opset. Default: 17.

    Returns:
        str: ``path``.
    """
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Two warnings are expected and silenced; every other one (a TracerWarning from a data-dependent
        # branch of a neck or head, say: the graph may then hold only the branch taken) is shown.
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript (it says
        # so, and its own code calls deprecated functions):
        warnings.filterwarnings('ignore', message='You are using the legacy TorchScript-based ONNX export',
                                category=DeprecationWarning)
        warnings.filterwarnings('ignore', category=DeprecationWarning, module=r'torch\.onnx\.')
        # the backbone's input checks (channels, smallest size) are Python conditions on the input shape:
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning, module=VanillaNet.__module__)
        torch.onnx.export(model, (example,), path, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
    return path


def export_backbone(model, path, shape=(1, 3, 800, 1216), dynamic=True, opset=DEFAULT_OPSET):
    """Export a fused VanillaNet to ONNX: input ``input``, outputs ``out{i}`` for each ``out_indices`` entry.

    Args:
        model (VanillaNet): fused (``deploy=True``).
        path (str): the ``.onnx`` file.
        shape (tuple[int]): example input (N, C, H, W). Default: (1, 3, 800, 1216).
        dynamic (bool): batch, height and width dynamic. Default: True.
        opset (int): Default: 17.

    Returns:
        str: ``path``.
    """
    model = _fused_backbone(model)
    example = _example_input(shape, next(model.parameters()).device)
    outputs = [f'out{i}' for i in model.out_indices]
    axes = None
    if dynamic:
        axes = {name: {0: 'batch', 2: 'height', 3: 'width'} for name in ['input'] + outputs}
    return export_onnx(model, path, example, ['input'], outputs, axes, opset)


def export_detector(detector, path, shape=(1, 3, 800, 1216), opset=DEFAULT_OPSET):
    """Export a single-stage detector's tensor outputs (fixed input shape: anchors depend on it downstream).

    Args:
        detector (SingleStageDetector): e.g. RetinaNet with a fused VanillaNet.
        path (str): the ``.onnx`` file.
        shape (tuple[int]): input (N, C, H, W), already normalised and padded. Default: (1, 3, 800, 1216).
        opset (int): Default: 17.

    Returns:
        tuple[str, list[str]]: ``path`` and the output names.
    """
    wrapper = DetectorTensorOutputs(detector).eval()
    example = _example_input(shape, next(detector.parameters()).device)
    with torch.no_grad():
        count = len(wrapper(example))
    half = count // 2
    names = [f'cls_score{i}' for i in range(half)] + [f'bbox_pred{i}' for i in range(count - half)]
    export_onnx(wrapper, path, example, ['input'], names, None, opset)
    return path, names


def onnx_session(path, threads=None):
    """An ONNX Runtime CPU session with all graph optimisations.

    Args:
        path (str): the ``.onnx`` file.
        threads (int | None): intra-op threads; None uses torch's thread count (the same cores as PyTorch).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def run_onnx(session, inputs):
    """Run a session on one input tensor; returns the outputs as tensors."""
    name = session.get_inputs()[0].name
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, {name: inputs.detach().cpu().numpy()})]


def check_onnx(session, module, inputs, tolerance=1e-4):
    """ONNX Runtime against PyTorch on ``inputs``; raises :class:`ONNXExportError` beyond ``tolerance``.

    Args:
        session: from :func:`onnx_session`.
        module (nn.Module): the exported module (eval mode).
        inputs (Tensor): a batch.
        tolerance (float): largest allowed deviation
            (:func:`~mmdet_vanillanet.output_comparison.relative_deviation`). Default: 1e-4.

    Returns:
        dict: as :func:`~mmdet_vanillanet.output_comparison.relative_deviation`.
    """
    with torch.no_grad():
        reference = flatten_tensors(module(inputs))
    outputs = run_onnx(session, inputs)
    return check_deviation(reference, outputs, tolerance, ('PyTorch', 'ONNX Runtime'), ONNXExportError,
                           ONNX_CHECK_MESSAGES)


def export_from_config(config, out, checkpoint=None, what='backbone', shape=(800, 1216), dynamic=True,
                       opset=DEFAULT_OPSET, tolerance=1e-4, seed=0):
    """Build a config's detector, load its checkpoint, fuse its VanillaNet, export, check with ONNX Runtime.

    Args:
        config (str): a detector config (training or ``deploy=True`` structure).
        out (str): the ``.onnx`` file to write.
        checkpoint (str | None): its trained (or deployed) checkpoint, loaded strictly through the safe
            loader. None exports random weights (for trying the export).
        what (str): 'backbone' (the fused VanillaNet, dynamic shapes) or 'detector' (a single-stage
            detector's tensor outputs, fixed shape). Default: 'backbone'.
        shape (tuple[int, int]): example image height and width. Default: (800, 1216).
        dynamic (bool): backbone only: dynamic batch, height and width. Default: True.
        opset (int): Default: 17.
        tolerance (float): largest allowed relative deviation of ONNX Runtime from PyTorch. Default: 1e-4.
        seed (int): seed of the check input (and of random weights). Default: 0.

    Returns:
        dict: ``path``, ``what``, ``outputs`` (names), ``max_rel``, ``max_abs``, ``input_shape``,
        ``checkpoint``.
    """
    if what not in ('backbone', 'detector'):
        raise ValueError(f'what must be "backbone" or "detector", got {what!r}.')
    with quiet_mmengine(), torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = build_detector(Config.fromfile(config).model, init_weights=not checkpoint)
        if checkpoint:
            load_detector_checkpoint(model, checkpoint)
    fuse_vanillanets(model)
    with _deleted_on_failure(out):
        return _export_and_check(model, out, what, shape, dynamic, opset, tolerance, seed, checkpoint)


@contextmanager
def _deleted_on_failure(path):
    """Delete ``path`` if the block raises: a graph that failed its export or its check is not left behind."""
    try:
        yield
    except BaseException:
        if osp.exists(path):
            os.remove(path)
        raise


def _export_and_check(model, out, what, shape, dynamic, opset, tolerance, seed, checkpoint):
    """The export and check of :func:`export_from_config`, on the fused detector ``model``."""
    height, width = shape
    if what == 'backbone':
        if not isinstance(model.backbone, VanillaNet):
            raise ONNXExportError(f'The config\'s backbone is {type(model.backbone).__name__}, not VanillaNet.')
        module, input_shape = model.backbone, (1, 3, height, width)
        export_backbone(module, out, input_shape, dynamic, opset)
        names = [f'out{i}' for i in module.out_indices]
    else:
        input_shape = (1, 3, *padded_shape(model, (height, width)))
        module = DetectorTensorOutputs(model)
        _, names = export_detector(model, out, input_shape, opset)
    inputs = torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed))
    result = check_onnx(onnx_session(out), module, inputs, tolerance)
    return dict(result, path=out, what=what, outputs=names, input_shape=input_shape, checkpoint=checkpoint)
