"""int8 inference of the fused VanillaNet inside any detector: post-training static quantization (PT2E).

The route, chosen by measurement (docs/precision.md): ``torch.export`` of the fused backbone with dynamic
batch, height and width, torchao's ``X86InductorQuantizer`` (per-channel int8 weights, int8 activations calibrated
by histogram observers; the 1x1 convs, the max pools and the series activations' depthwise convs all run in
int8), then ``torch.compile`` with inductor freezing, which lowers the quantized convs to oneDNN's int8
kernels (VNNI / AMX-INT8). Under ``torch.autocast('cpu', torch.bfloat16)`` the same model runs
int8-mixed-bf16. mmcv's ops cannot be exported, so only the backbone is quantized: the neck, heads and
post-processing stay as they are, and box decoding, NMS and RoIAlign see what they always see.

What reproduces a quantized backbone is small and safe to share: the fused checkpoint plus a calibration file
(:func:`save_calibration`), holding every observer's statistics as plain tensors (read weights-only) and
where they came from. :func:`quantize_vanillanet` with ``calibration=`` rebuilds the identical int8 model
without the calibration images.
"""
import copy

import torch
import torch._inductor.config
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from ..checkpoint.safe_load import read_checkpoint
from ..models import VanillaNet
from .int8_depthwise import put_depthwise_on_kernel

CALIBRATION_FORMAT = 'mmdet_vanillanet/int8-calibration/v1'


def _import_pt2e():
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as error:  # torchao is part of `make install`; a hand-made environment may lack it
        raise ImportError('int8 quantization needs torchao (PT2E, X86InductorQuantizer): pip install torchao, or '
                          f'`make install`. ({error})') from error
    return prepare_pt2e, convert_pt2e, x86


def check_quantizable(net):
    """Raise a worded error unless ``net`` is a VanillaNet that int8 quantization supports.

    Args:
        net (nn.Module): the backbone.
    """
    if not isinstance(net, VanillaNet):
        raise TypeError(f'int8 quantization takes a VanillaNet backbone, got {type(net).__name__}.')
    if net.ada_pool:
        raise ValueError('int8 quantization does not support the ada-pool variant (its adaptive pools have no '
                         'static shape to export); use vanillanet_13_x1_5 or fp32 / bf16.')


def _export(module, example, stride):
    """``torch.export`` of ``module`` for any batch of images whose height and width are multiples of ``stride``."""
    batch = torch.export.Dim('batch', min=1, max=1024)
    height = torch.export.Dim('height_blocks', min=1, max=4096 // stride)
    width = torch.export.Dim('width_blocks', min=1, max=4096 // stride)
    spec = {'x': {0: batch, 2: stride * height, 3: stride * width}}
    # strict (Dynamo) export records each functional conv's source, so the quantizer annotates the series
    # activations' depthwise convs too; a non-strict export leaves them in fp32
    return torch.export.export(module, (example,), dynamic_shapes=spec, strict=True).module()


def _observers_by_input(prepared):
    """Every observer of a prepared PT2E graph, keyed by the name of the node it observes.

    The observers' own names (``activation_post_process_N``) are numbered in an order that changes from one
    ``prepare_pt2e`` to the next; the observed nodes' names come from the export and do not.
    """
    observers = {}
    for node in prepared.graph.nodes:
        if node.op == 'call_module' and node.target.startswith('activation_post_process'):
            observed = node.args[0].name
            if observed in observers:
                raise RuntimeError(f'int8: two observers watch {observed!r}; the calibration cannot name them.')
            observers[observed] = prepared.get_submodule(node.target)
    return observers


def _observer_state(prepared):
    return {f'{observed}:{key}': value.clone() for observed, observer in _observers_by_input(prepared).items()
            for key, value in observer.state_dict().items()}


def _load_observer_state(prepared, state):
    observers = _observers_by_input(prepared)
    expected = {f'{observed}:{key}' for observed, observer in observers.items() for key in observer.state_dict()}
    if set(state) != expected:
        raise ValueError(f'The int8 calibration does not fit this backbone: it has {len(state)} observer tensors, the '
                         f'backbone needs {len(expected)}. Calibrate again with tools/quantize.py.')
    for observed, observer in observers.items():
        # the buffers replaced whole: the observers' own loading skips ``eps`` and assumes calibrated shapes
        for key in observer.state_dict():
            observer._buffers[key] = state[f'{observed}:{key}'].clone()


def quantize_pt2e(module, stride, calibration_inputs=None, observers=None, in_channels=3):
    """PT2E static int8 quantization of an image backbone: export, prepare, calibrate (or load), convert.

    Args:
        module (nn.Module): the backbone in eval mode; ``forward(x)`` takes images (N, C, H, W).
        stride (int): its total stride; height and width must be multiples of it.
        calibration_inputs (Iterable[Tensor] | None): image batches to calibrate the observers on.
        observers (dict[str, Tensor] | None): observer statistics of an earlier calibration instead.
        in_channels (int): image channels. Default: 3.

    Returns:
        tuple[torch.fx.GraphModule, dict[str, Tensor]]: the converted model and the observer statistics.
    """
    if (calibration_inputs is None) == (observers is None):
        raise ValueError('int8 quantization needs either calibration_inputs (images) or calibration (a file).')
    prepare_pt2e, convert_pt2e, x86 = _import_pt2e()
    example = torch.zeros(2, in_channels, stride * 2, stride * 2)
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    with torch.no_grad():
        prepared = prepare_pt2e(_export(module, example, stride), quantizer)
        if observers is None:
            count = 0
            for inputs in calibration_inputs:
                prepared(_checked_input(stride, inputs))
                count += inputs.shape[0]
            if not count:
                raise ValueError('int8 calibration got no images.')
            observers = _observer_state(prepared)
        else:
            _load_observer_state(prepared, observers)
        quantized = convert_pt2e(prepared)
    return quantized, observers


def describe(net):
    """What a calibration must have been made for: ``arch``, ``act_num`` and ``out_indices`` of ``net``."""
    arch = net.arch_name or dict(dims=list(net.dims), strides=list(net.strides))
    return dict(arch=arch, act_num=net.act_num, out_indices=list(net.out_indices))


def quantize_vanillanet(net, calibration_inputs=None, calibration=None):
    """An int8 copy of the fused VanillaNet ``net``, calibrated on images or rebuilt from a calibration.

    Args:
        net (VanillaNet): the backbone (the training structure is fused first, on a copy).
        calibration_inputs (Iterable[Tensor] | None): preprocessed image batches (N, 3, H, W) as the detector's
            data preprocessor makes them, H and W multiples of the backbone's total stride.
        calibration (dict | None): what :class:`Int8VanillaNet` ``.calibration`` holds (:func:`describe` of the
            backbone and the observer statistics), e.g. an entry of :func:`load_calibration`, instead of images.

    Returns:
        Int8VanillaNet
    """
    check_quantizable(net)
    fused = copy.deepcopy(net).eval()
    fused.switch_to_deploy()
    if calibration is not None:
        described = {key: calibration[key] for key in ('arch', 'act_num', 'out_indices') if key in calibration}
        actual = {key: value for key, value in describe(fused).items() if key in described}
        if described != actual:
            raise ValueError(f'The int8 calibration does not fit this backbone: it was made for {described}, this '
                             f'backbone is {actual}. Calibrate again with tools/quantize.py.')
    quantized, observers = quantize_pt2e(fused, fused.min_input_size, calibration_inputs,
                                         calibration and calibration['observers'], fused.in_channels)
    int8 = Int8VanillaNet(quantized, fused, observers)
    int8.depthwise_on_kernel = put_depthwise_on_kernel(quantized)
    return int8


def _checked_input(stride, x):
    if x.dim() != 4 or x.shape[-2] % stride or x.shape[-1] % stride:
        raise ValueError(f'The int8 backbone takes images whose height and width are multiples of {stride}, got '
                         f'{tuple(x.shape)}; set the detector\'s data_preprocessor pad_size_divisor to {stride}.')
    return x


class Int8Backbone(nn.Module):
    """A PT2E-quantized backbone (:func:`quantize_pt2e`), compiled by inductor with freezing on its first call.

    Stands in for the fp32 backbone of a detector: the same outputs (dequantized: fp32, or bf16 under CPU
    autocast), NCHW-contiguous; inference only. A new input shape compiles once more (inductor marks the
    changing sizes dynamic after the first change).

    Args:
        quantized (torch.fx.GraphModule): the converted model.
        stride (int): the total stride; height and width must be multiples of it.
    """

    def __init__(self, quantized, stride):
        super().__init__()
        self.quantized = quantized
        self.stride = stride
        self._compiled = torch.compile(self.quantized)

    def train(self, mode=True):
        if mode:
            raise RuntimeError('An int8 backbone is for inference only; train the fp32 detector and quantize it '
                               'again with tools/quantize.py.')
        self.training = False  # the exported graph has no modes to switch (and refuses .eval())
        return self

    def init_weights(self):
        """Nothing to initialise: the weights are quantized."""

    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError('An int8 backbone runs without gradients: call it under torch.no_grad().')
        # freezing turns the int8 weights into constants, which lets inductor use oneDNN's int8 kernels
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            outs = self._compiled(_checked_input(self.stride, x))
        return tuple(out.contiguous() for out in outs)


class Int8VanillaNet(Int8Backbone):
    """A fused VanillaNet quantized to int8: an :class:`Int8Backbone` that describes its outputs as the
    VanillaNet does (``out_indices``, ``out_channels``, ``out_strides``) and keeps its calibration.

    Args:
        quantized (torch.fx.GraphModule): the converted PT2E model.
        source (VanillaNet): the fused backbone it was made from (its description is kept, not its weights).
        observers (dict[str, Tensor]): the calibration statistics; ``calibration`` holds them with
            :func:`describe` of the source (what :func:`save_calibration` writes).

    ``depthwise_on_kernel`` counts the series activations that :func:`quantize_vanillanet` put on the project's
    depthwise kernel (:mod:`.int8_depthwise`); 0 where it does not run, and they stay oneDNN int8 convs.
    """

    def __init__(self, quantized, source, observers):
        super().__init__(quantized, source.min_input_size)
        self.calibration = dict(describe(source), observers=observers)
        self.out_indices, self.in_channels = source.out_indices, source.in_channels
        self.out_channels, self.out_strides = source.out_channels, source.out_strides
        self.depthwise_on_kernel = 0


def replace_with_int8(detector, calibration):
    """Swap every VanillaNet inside ``detector`` for its int8 copy, rebuilt from ``calibration``; in place.

    Args:
        detector (nn.Module): a detector with its trained weights loaded (a model wrapper is unwrapped).
        calibration (dict): as :func:`load_calibration` returns.

    Returns:
        list[str]: the names of the replaced modules.
    """
    if is_model_wrapper(detector):
        detector = detector.module
    names = [name for name, module in detector.named_modules() if isinstance(module, VanillaNet)]
    if not names:
        raise ValueError('int8: the detector holds no VanillaNet to quantize.')
    missing = [name for name in names if name not in calibration['backbones']]
    if missing:
        raise ValueError(f'The int8 calibration has no entry for {missing} (it has {sorted(calibration["backbones"])});'
                         ' calibrate this detector with tools/quantize.py.')
    for name in names:
        int8 = quantize_vanillanet(detector.get_submodule(name), calibration=calibration['backbones'][name])
        parent, _, attr = name.rpartition('.')
        setattr(detector.get_submodule(parent) if parent else detector, attr, int8)
    print_log(f'int8: {", ".join(names)} replaced by int8 copies (PT2E, {calibration["meta"].get("num_images")} '
              'calibration images).', logger='current')
    return names


def save_calibration(path, backbones, meta):
    """Write what reproduces the int8 backbones: observer statistics (tensors only) and where they came from.

    Args:
        path (str): the ``.pth`` file.
        backbones (dict[str, Int8VanillaNet]): module name inside the detector -> int8 backbone.
        meta (dict): plain data (str, int, float, lists): config, checkpoint, images, versions.
    """
    torch.save(dict(format=CALIBRATION_FORMAT, meta=meta,
                    backbones={name: net.calibration for name, net in backbones.items()}), path)


def load_calibration(path):
    """Read a calibration file written by :func:`save_calibration` (weights-only: no code runs).

    Args:
        path (str): the ``.pth`` file.
    """
    data = read_checkpoint(path)
    if not isinstance(data, dict) or data.get('format') != CALIBRATION_FORMAT:
        raise ValueError(f'{path} is not an int8 calibration file of this project (format {CALIBRATION_FORMAT!r}); '
                         'write one with tools/quantize.py CONFIG CHECKPOINT --out FILE.')
    return data
