"""The benchmark's ``precision`` group: the same models in fp32, bf16 and int8, side by side.

- roofline: ``torch.mm`` in fp32 and bf16, ``torch._int_mm`` in int8 (int32 accumulation);
- backbone: the fused VanillaNet (default fp32 path; bf16 under autocast, its oneDNN path and torch's plain
  autocast; int8 by PT2E; OpenVINO f32 and bf16 on its ONNX export) beside mmdet's ResNet-50 backbone
  (channels-last, fp32 / bf16 / int8 by the same PT2E route);
- detectors: RetinaNet and Mask R-CNN with the fused VanillaNet, ResNet-50 and Swin-T in fp32, bf16
  (:func:`~mmdet_vanillanet.precision.bf16.bf16_inference`) and with an int8 backbone; OpenVINO f32 / bf16
  for the exported fused RetinaNet.

Each reduced-precision row's speed-up is against the same model in fp32, its note gives its output deviation
from fp32. VanillaNets get scale-preserving random weights (:func:`.benchmark_models.scale_preserving_init_`). Where the
CPU lacks native bf16 or int8 the row says so and is not timed: emulation would measure the emulator.
"""
import contextlib
import functools
import gc
import os

import numpy as np
import torch

from .. import cpu_support
from ..export import export_backbone, export_detector
from ..output_comparison import detector_outputs, flatten_tensors, relative_deviation
from ..precision.bf16 import bf16_inference
from ..precision.int8 import Int8Backbone, quantize_pt2e, quantize_vanillanet
from .benchmark_models import (
    BASELINE_NAMES,
    DETECTOR_NAMES,
    build_backbone,
    build_detector,
    detector_config,
    detector_inputs,
    scale_preserving_init_,
)
from .groups import _onnx_dir
from .latency import time_interleaved
from .roofline import gemm_flops, gemm_inputs

ROOFLINE = 'reduced precision: roofline'
BACKBONE = 'reduced precision: backbone'
VANILLANET = 'VanillaNet-13 fused'
# backbones whose int8 rows are measured (PT2E with the X86 inductor quantizer: convs, pools)
INT8_BACKBONES = ('vanillanet', 'r50')
INT8_BF16 = 'int8 backbone (PT2E), rest bf16'
NOT_NATIVE = {'bf16': 'not measured: no native bf16 on this CPU', 'int8': 'not measured: no native int8 on this CPU'}


def _native(precision):
    return dict(fp32=True, bf16=cpu_support.native_bf16(), int8=cpu_support.native_int8())[precision]


def _in_bf16(fn):
    def call():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return fn()
    return call


def _openvino_calls(onnx_path, x, log):
    """OpenVINO f32 and bf16 compiled models of ``onnx_path``, as calls on ``x`` (None where absent)."""
    try:
        import openvino as ov
    except ImportError:
        log('openvino is not installed: no OpenVINO rows')
        return {}
    core = ov.Core()
    x_numpy = x.numpy()
    calls = {}
    for hint in ('f32', 'bf16'):
        if hint == 'bf16' and not cpu_support.native_bf16():
            continue
        compiled = core.compile_model(onnx_path, 'CPU', {'INFERENCE_PRECISION_HINT': hint,
                                                         'PERFORMANCE_HINT': 'LATENCY',
                                                         'INFERENCE_NUM_THREADS': torch.get_num_threads()})
        request = compiled.create_infer_request()
        calls[hint] = lambda request=request: tuple(torch.from_numpy(np.asarray(value))
                                                    for value in request.infer({0: x_numpy}).values())
    return calls


def _fill(report, section, timings, base_of, notes):
    for name, timing in timings.items():
        row = report.row(section, name)
        row.seconds, row.seconds_min = timing.median, timing.min
        base = timings.get(base_of.get(name))
        if base is not None:
            row.speedup = base.median / timing.median
        row.notes += notes.get(name, [])


def _deviation_note(reference, outputs):
    return f'vs fp32: {relative_deviation(flatten_tensors(reference), flatten_tensors(outputs))["max_rel"]:.1e} rel'


def run_roofline(report, options, log):
    """GEMM throughput per precision: the bound each precision's rows are read against."""
    size = options.gemm_size
    a, b, out = gemm_inputs(size)
    calls = {'GEMM fp32 (torch.mm)': lambda: torch.mm(a, b, out=out)}
    if _native('bf16'):
        ab, bb, outb = gemm_inputs(size, dtype=torch.bfloat16)
        calls['GEMM bf16 (torch.mm)'] = lambda: torch.mm(ab, bb, out=outb)
    if _native('int8'):
        ai, bi = (torch.randint(-127, 128, (size, size), dtype=torch.int8,
                                generator=torch.Generator().manual_seed(i)) for i in (0, 1))
        calls['GEMM int8 (torch._int_mm, int32 sums)'] = lambda: torch._int_mm(ai, bi)
    log(f'precision: roofline, {len(calls)} GEMMs of {size}^3')
    timings = time_interleaved(calls, options.warmup, options.repeats)
    for name, timing in timings.items():
        row = report.row(ROOFLINE, name)
        row.seconds, row.seconds_min = timing.median, timing.min
        row.gflops = gemm_flops(size) / timing.median / 1e9
        row.gemm_share = row.gflops / (gemm_flops(size) / timings['GEMM fp32 (torch.mm)'].median / 1e9)
    for precision in ('bf16', 'int8'):
        if not _native(precision):
            report.row(ROOFLINE, f'GEMM {precision}').notes.append(NOT_NATIVE[precision])


def _baseline_backbone(options):
    cfg = detector_config('retinanet', 'r50')
    model = build_detector(cfg)
    backbone = model.backbone.to(memory_format=torch.channels_last)
    backbone.eval()  # mmdet's ResNet.train() returns None
    return backbone


def run_backbones(report, options, log):
    """The fused VanillaNet and ResNet-50 backbones in each precision, OpenVINO f32 / bf16 for the former."""
    h, w = options.shape
    x = torch.randn(options.batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    log('precision: building the fused VanillaNet and the ResNet-50 backbone')
    fused = scale_preserving_init_(build_backbone(True, options.arch, options.act_num, options.out_indices))
    r50 = _baseline_backbone(options)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    models = {VANILLANET: (fused, x, fused.min_input_size), 'ResNet-50 (channels_last)': (r50, x_cl, 32)}
    calls, base_of, notes, references = {}, {}, {}, {}
    with torch.no_grad():
        for model_name, (model, inputs, stride) in models.items():
            fp32 = f'{model_name}, fp32'
            calls[fp32] = lambda m=model, i=inputs: m(i)
            references[model_name] = calls[fp32]()
            variants = {}
            if _native('bf16'):
                variants[f'{model_name}, bf16 (autocast)'] = _in_bf16(lambda m=model, i=inputs: m(i))
                if model is fused:
                    def plain_autocast(m=model, i=inputs):
                        m.fast_inference = False
                        try:
                            return m(i)
                        finally:
                            m.fast_inference = True
                    variants[f'{model_name}, bf16 (torch\'s plain autocast)'] = _in_bf16(plain_autocast)
            if _native('int8'):
                log(f'precision: int8 {model_name} (PT2E, calibrating on 2 random images, inductor compile)')
                images = [torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
                int8 = quantize_vanillanet(fused, calibration_inputs=images) if model is fused else \
                    _int8_baseline(model, stride, images, report, BACKBONE, f'{model_name}, int8')
                if int8 is not None:
                    variants[f'{model_name}, int8 (PT2E, inductor)'] = lambda m=int8, i=inputs: m(i)
            for precision in ('bf16', 'int8'):
                if not _native(precision):
                    report.row(BACKBONE, f'{model_name}, {precision}').notes.append(NOT_NATIVE[precision])
            for name, call in variants.items():
                notes[name] = [_deviation_note(references[model_name], call())]
                base_of[name] = fp32
            calls.update(variants)
        with _onnx_dir(options) as folder:
            calls.update(_openvino_rows(lambda path, net=fused: export_backbone(net, path, tuple(x.shape)),
                                        os.path.join(folder, 'vanillanet_backbone_fused.onnx'), x,
                                        references[VANILLANET], VANILLANET, base_of, notes, log))
            log(f'precision: timing {len(calls)} backbone rows round-robin')
            timings = time_interleaved(calls, options.warmup, options.repeats)
    _fill(report, BACKBONE, timings, base_of, notes)
    del fused, r50, calls
    gc.collect()


def _int8_baseline(backbone, stride, images, report, section, row_name):
    """A baseline backbone through the same PT2E route; None, with the reason in its row, where PT2E fails on it."""
    try:
        return Int8Backbone(quantize_pt2e(backbone, stride, images)[0], stride)
    except (ValueError, RuntimeError, NotImplementedError) as error:  # e.g. torchao's annotation of in-place adds
        reason = str(error).strip().splitlines()[0]
        report.row(section, row_name).notes.append(f'not measured: PT2E failed on this backbone ({reason})')
        return None


@contextlib.contextmanager
def _backbone_swapped(model, backbone):
    original = model.backbone
    model.backbone = backbone
    try:
        yield
    finally:
        model.backbone = original


def _detector_variants(model, inputs, backbone, label, log, report, section):
    """The reduced-precision contexts of one detector: bf16 whole; an int8 backbone, the rest fp32 or bf16."""
    variants = {}
    if _native('bf16'):
        variants['bf16 (autocast, fp32 post-processing)'] = lambda: bf16_inference(model)
    if _native('int8') and backbone not in INT8_BACKBONES:
        report.row(section, f'{label}, int8').notes.append(
            'not measured: the int8 rows quantize convolutional backbones (PT2E on Swin-T took over 8 min here)')
    elif _native('int8'):
        log(f'precision: int8 backbone of {label} (PT2E, inductor compile)')
        images = [torch.randn(1, 3, *inputs.shape[-2:], generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
        int8 = quantize_vanillanet(model.backbone, calibration_inputs=images) if backbone == 'vanillanet' else \
            _int8_baseline(model.backbone, 32, images, report, section, f'{label}, int8')
        if int8 is not None:
            variants['int8 backbone (PT2E), rest fp32'] = lambda: _backbone_swapped(model, int8)
            if _native('bf16'):
                variants[INT8_BF16] = lambda: _int8_backbone_bf16_rest(model, int8)
    return variants


@contextlib.contextmanager
def _int8_backbone_bf16_rest(model, int8):
    with _backbone_swapped(model, int8), bf16_inference(model):
        yield


def _timed_in(context, forward):
    def call():
        with context():
            return forward()
    return call


def run_detectors(report, options, log):
    """RetinaNet and Mask R-CNN, fused VanillaNet against the baselines, each in each precision.

    Timed: ``mode='tensor'`` forwards. Deviations: :func:`detector_outputs`, two-stage detectors at the fp32
    run's proposals (the RPN's top-k may choose other boxes in another precision).
    """
    for detector in options.detectors:
        section = f'reduced precision: {DETECTOR_NAMES[detector]}'
        kwargs = dict(arch=None if options.is_recipe_backbone else options.arch,
                      act_num=None if options.is_recipe_backbone else options.act_num)
        models = [(VANILLANET, 'vanillanet', detector_config(detector, 'vanillanet', deploy=True, **kwargs))]
        models += [(BASELINE_NAMES[b], b, detector_config(detector, b)) for b in options.baselines]
        calls, base_of, notes, built = {}, {}, {}, []
        with torch.no_grad():
            for label, backbone, cfg in models:
                log(f'{section}: building {label}')
                model = scale_preserving_init_(build_detector(cfg))
                inputs, samples = detector_inputs(model, options.shape, options.batch)
                built.append(model)
                forward = functools.partial(model, inputs, samples, mode='tensor')
                fp32 = f'{label}, fp32'
                calls[fp32] = forward
                reference, proposals = detector_outputs(model, inputs, samples)
                for precision in ('bf16', 'int8'):
                    if not _native(precision):
                        report.row(section, f'{label}, {precision}').notes.append(NOT_NATIVE[precision])
                for name, context in _detector_variants(model, inputs, backbone, label, log, report, section).items():
                    full = f'{label}, {name}'
                    calls[full], base_of[full] = _timed_in(context, forward), fp32
                    with context():
                        outputs, _ = detector_outputs(model, inputs, samples, proposals)
                    notes[full] = [_deviation_note(reference, outputs)]
                if detector == 'retinanet' and backbone == 'vanillanet':
                    with _onnx_dir(options) as folder:  # tensor outputs: the head's raw maps, as timed above
                        calls.update(_openvino_rows(
                            lambda path, m=model: export_detector(m, path, tuple(inputs.shape)),
                            os.path.join(folder, 'retinanet_vanillanet_fused.onnx'), inputs, reference, label,
                            base_of, notes, log))
            log(f'{section}: timing {len(calls)} rows round-robin')
            timings = time_interleaved(calls, options.warmup, options.repeats)
        _fill(report, section, timings, base_of, notes)
        del built, calls
        gc.collect()


def _openvino_rows(export, path, inputs, reference, label, base_of, notes, log):
    """OpenVINO f32 / bf16 rows of a model exported to ONNX by ``export(path)``, against ``label``'s fp32 row."""
    log(f'precision: exporting {label} to {path} for OpenVINO')
    export(path)
    calls = {}
    for hint, call in _openvino_calls(path, inputs, log).items():
        name = f'{label}, OpenVINO {hint}'
        calls[name], base_of[name] = call, f'{label}, fp32'
        notes[name] = [_deviation_note(reference, call())]
    return calls


def run_reduced_precision(report, options, log):
    """The ``precision`` group: roofline, backbones, detectors."""
    report.meta['native'] = cpu_support.describe()
    if torch.device(options.device).type != 'cpu':
        report.row(ROOFLINE, 'reduced precision').notes.append(f'CPU-only group: not run on {options.device}')
        return
    run_roofline(report, options, log)
    run_backbones(report, options, log)
    run_detectors(report, options, log)
