"""The benchmark's groups: backbone latency against the GEMM roofline, detectors (complexity, latency,
ONNX Runtime), and the training step with and without ``with_cp``. Each fills rows of a :class:`Report`."""
import copy
import gc
import os
import statistics
import tempfile
import time
from contextlib import contextmanager

import torch

from ..output_comparison import relative_deviation
from .benchmark_models import (
    BASELINE_NAMES,
    DETECTOR_NAMES,
    PAPER,
    build_backbone,
    build_detector,
    detector_config,
    detector_inputs,
)
from .complexity import complexity, detector_complexity
from .latency import time_interleaved
from .options import FAST_ROW, TRAIN_ROW
from .roofline import achieved_gflops, gemm_bound_seconds, gemm_flops, gemm_inputs, onednn_gemm_call

_BACKBONE_SECTION = 'backbone'
# the rows of the fused forms that compute the training structure's function in PyTorch
_FUSED_ROWS = ('fused, NCHW (plain PyTorch)', 'fused + channels_last', FAST_ROW)
_COMPILED_ROW = 'fused + torch.compile (inductor, freezing)'
_BACKBONE_ONNX_ROW = 'fused, ONNX Runtime (CPU)'
_DETECTOR_ONNX_ROW = 'fused, ONNX Runtime (CPU), tensor outputs'


@contextmanager
def _inductor_freezing():
    import torch._inductor.config as inductor_config
    old = inductor_config.freezing
    inductor_config.freezing = True
    try:
        yield
    finally:
        inductor_config.freezing = old


def _fused_copy(train_net, **flags):
    net = copy.deepcopy(train_net)
    net.switch_to_deploy()
    for name, value in flags.items():
        setattr(net, name, value)
    return net.eval()


def _variant(net, **flags):
    """A call of ``net`` with some attributes set for the call (variants share one fused module)."""
    def call(x):
        for name, value in flags.items():
            setattr(net, name, value)
        return net(x)
    return call


def _gemm_names(options, is_cpu):
    """The row names of the two GEMMs: torch.mm, the roofline, and oneDNN's 1x1 conv of the same size."""
    return (f'GEMM: torch.mm {options.gemm_size}x{options.gemm_size} fp32',
            f'GEMM: oneDNN 1x1 conv, same size{" (blocked layout)" if is_cpu else ""}')


def _backbone_calls(train, fused, x, options, is_cpu):
    """The timed calls of the backbone section, by row name: the two GEMMs, then every form of the backbone."""
    gemm_name, onednn_gemm_name = _gemm_names(options, is_cpu)
    a, b, out = gemm_inputs(options.gemm_size, options.device)
    train_default = _variant(train, channels_last=train.channels_last)
    train_nchw = _variant(train, channels_last=False)
    plain = _variant(fused, channels_last=False, fast_inference=False)
    cl = _variant(fused, channels_last=True, fast_inference=False)
    fast = _variant(fused, channels_last=True, fast_inference=True)
    calls = {
        gemm_name: lambda: torch.mm(a, b, out=out),
        onednn_gemm_name: onednn_gemm_call(options.gemm_size, options.device),
        TRAIN_ROW: lambda: train_default(x),
        'training structure, NCHW': lambda: train_nchw(x),
        'fused, NCHW (plain PyTorch)': lambda: plain(x),
        'fused + channels_last': lambda: cl(x),
    }
    if is_cpu:
        calls[FAST_ROW] = lambda: fast(x)
    return calls


def _compiled_call(train, x, reference, log):
    """The fused backbone under torch.compile (inductor, freezing): its timed call and its notes."""
    compiled_net = _fused_copy(train, channels_last=True, fast_inference=False)
    log('backbone: torch.compile (inductor, freezing) ...')
    start = time.perf_counter()
    with _inductor_freezing(), torch.no_grad():
        compiled = torch.compile(compiled_net)
        compiled_out = compiled(x)
    deviation = relative_deviation(reference, compiled_out)['max_rel']
    notes = [f'compile {time.perf_counter() - start:.0f} s', f'vs eager: {deviation:.1e} rel']

    def run_compiled():
        with _inductor_freezing():
            return compiled(x)
    return run_compiled, notes


def _fill_gemm_rows(report, timings, options, is_cpu):
    """The rows of the two GEMMs, taken out of ``timings``; returns the GFLOP/s of torch.mm, the roofline."""
    gemm_name, onednn_gemm_name = _gemm_names(options, is_cpu)
    gemm = timings.pop(gemm_name)
    gemm_gflops = gemm_flops(options.gemm_size) / gemm.median / 1e9
    row = report.row(_BACKBONE_SECTION, gemm_name)
    row.seconds, row.seconds_min, row.gflops, row.gemm_share = gemm.median, gemm.min, gemm_gflops, 1.0
    row.notes.append(f'{gemm_flops(options.gemm_size) / 1e9:.0f} GFLOP per call; the roofline')
    report.meta['gemm_gflops'] = gemm_gflops
    onednn_gemm = timings.pop(onednn_gemm_name)
    row = report.row(_BACKBONE_SECTION, onednn_gemm_name)
    row.seconds, row.seconds_min = onednn_gemm.median, onednn_gemm.min
    row.gflops = gemm_flops(options.gemm_size) / onednn_gemm.median / 1e9
    row.gemm_share = row.gflops / gemm_gflops
    row.notes.append('the kernel of the fused 1x1 convs, for reference')
    return gemm_gflops


def _fill_backbone_rows(report, timings, costs, gemm_gflops, notes, extras):
    """One row per timed form of the backbone: cost, latency, speed-up and its place against the roofline."""
    base = timings[TRAIN_ROW].median
    for name, timing in timings.items():
        cost = costs['train'] if name.startswith('training') else costs['fused']
        row = report.row(_BACKBONE_SECTION, name)
        row.params, row.flops = cost['params'], cost['flops']
        row.seconds, row.seconds_min = timing.median, timing.min
        row.speedup = base / timing.median
        row.bound_ratio = timing.median / gemm_bound_seconds(cost['flops'], gemm_gflops)
        row.gflops = achieved_gflops(cost['flops'], timing.median)
        row.gemm_share = row.gflops / gemm_gflops
        row.notes += notes.get(name, [])
        row.extra.update(extras.get(name, {}))


def run_backbone(report, options, log):
    """Backbone latency in every form, interleaved with the GEMM; the roofline figures."""
    device = options.device
    is_cpu = torch.device(device).type == 'cpu'
    h, w = options.shape
    x = torch.randn(options.batch, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    log(f'backbone: building {options.arch} (act_num {options.act_num}) and fusing it')
    train = build_backbone(False, options.arch, options.act_num, options.out_indices, device=device)
    fused = _fused_copy(train)
    log('backbone: counting FLOPs (mmengine FlopAnalyzer)')
    costs = dict(train=complexity(train, x), fused=complexity(fused, x))
    calls = _backbone_calls(train, fused, x, options, is_cpu)
    notes, extras = {}, {}
    with torch.no_grad():  # the fused forms compute the training structure's function
        reference = train(x)
        for name in _FUSED_ROWS:
            if name in calls:
                deviation = relative_deviation(reference, calls[name]())['max_rel']
                notes[name] = [f'= training structure within {deviation:.1e} rel']
                extras[name] = dict(fused_vs_training_max_rel=deviation)
    if options.compile:
        calls[_COMPILED_ROW], notes[_COMPILED_ROW] = _compiled_call(train, x, reference, log)
    if 'onnx' in options.only and is_cpu:
        calls[_BACKBONE_ONNX_ROW], check = _backbone_onnx(fused, x, options, log)
        notes[_BACKBONE_ONNX_ROW] = [f'vs PyTorch: {check["max_rel"]:.1e} rel']
        extras[_BACKBONE_ONNX_ROW] = dict(onnx_max_rel=check['max_rel'])
    log(f'backbone: timing {len(calls)} rows round-robin, {options.warmup} warm-up + {options.repeats} rounds')
    with torch.no_grad():
        timings = time_interleaved(calls, options.warmup, options.repeats, device)
    gemm_gflops = _fill_gemm_rows(report, timings, options, is_cpu)
    _fill_backbone_rows(report, timings, costs, gemm_gflops, notes, extras)
    report.meta['backbone'] = dict(train=costs['train'], fused=costs['fused'],
                                   gemm_bound_s=gemm_bound_seconds(costs['fused']['flops'], gemm_gflops))
    del train, fused, calls
    gc.collect()


def _onnx_call(export, module, x, file_name, what, options, log):
    """Export ``what`` with ``export(path)`` and check ONNX Runtime against ``module`` on ``x``.

    The file goes to ``options.onnx_dir``, or a temporary folder. Returns the timed call (ONNX Runtime on
    ``x``) and the check (:func:`~mmdet_vanillanet.export.check_onnx`).
    """
    from ..export import check_onnx, onnx_session
    with _onnx_dir(options) as folder:
        path = os.path.join(folder, file_name)
        log(f'onnx: exporting {what} to {path}')
        export(path)
        session = onnx_session(path)
        check = check_onnx(session, module, x)
    x_numpy = x.cpu().numpy()
    return lambda: session.run(None, {'input': x_numpy}), check


def _backbone_onnx(fused, x, options, log):
    from ..export import export_backbone
    return _onnx_call(lambda path: export_backbone(fused, path, tuple(x.shape)), fused, x,
                      'vanillanet_backbone_fused.onnx', 'the fused backbone', options, log)


def _detector_onnx(model, inputs, options, log):
    from ..export import DetectorTensorOutputs, export_detector
    return _onnx_call(lambda path: export_detector(model, path, tuple(inputs.shape)), DetectorTensorOutputs(model),
                      inputs, 'retinanet_vanillanet_fused.onnx', 'the fused RetinaNet (tensor outputs)', options, log)


@contextmanager
def _onnx_dir(options):
    if options.onnx_dir:
        os.makedirs(options.onnx_dir, exist_ok=True)
        yield options.onnx_dir
    else:
        with tempfile.TemporaryDirectory(prefix='vanillanet_onnx_') as folder:
            yield folder


def _detector_models(detector, options):
    """(row name, key for the paper table, config) of every detector of one section."""
    recipe = options.is_recipe_backbone
    kwargs = dict(arch=None if recipe else options.arch, act_num=None if recipe else options.act_num)
    arch = 'VanillaNet-13' if recipe else 'VanillaNet'
    models = [(f'{arch}, training structure', None, detector_config(detector, 'vanillanet', **kwargs)),
              (f'{arch}, fused', 'vanillanet', detector_config(detector, 'vanillanet', deploy=True, **kwargs))]
    for baseline in options.baselines:
        models.append((BASELINE_NAMES[baseline], baseline, detector_config(detector, baseline)))
    return models


def run_detectors(report, options, log):
    """Complexity and/or latency of every detector; ONNX Runtime rows for the fused RetinaNet."""
    device = options.device
    is_cpu = torch.device(device).type == 'cpu'
    for detector in options.detectors:
        section = DETECTOR_NAMES[detector]
        built = []
        for name, paper_key, cfg in _detector_models(detector, options):
            log(f'{section}: building {name}')
            model = build_detector(cfg, device)
            inputs, data_samples = detector_inputs(model, options.shape, options.batch, device)
            built.append((name, model))
            row = report.row(section, name)
            paper = PAPER.get((detector, paper_key))
            if paper:
                row.notes.append(f'paper: {paper["params_m"]}M, {paper["gflops"]} GFLOPs')
            if 'complexity' in options.only:
                log(f'{section}: counting FLOPs of {name}')
                cost = detector_complexity(model, inputs, data_samples)
                row.params, row.flops = cost['params'], cost['flops']
                row.extra['series_activation_flops'] = cost['series_activation_flops']
                if paper_key == 'vanillanet':
                    row.notes.append(f'without the depthwise convs of the activations (the paper\'s counter '
                                     f'missed them): {(cost["flops"] - cost["series_activation_flops"]) / 1e9:.1f}')
        if 'detector' in options.only:
            calls = {name: (lambda m=model: m(inputs, data_samples, mode='tensor')) for name, model in built}
            fused_name, fused_model = built[1]
            onnx_name = None
            if 'onnx' in options.only and detector == 'retinanet' and is_cpu:
                onnx_name = _DETECTOR_ONNX_ROW
                calls[onnx_name], check = _detector_onnx(fused_model, inputs, options, log)
                row = report.row(section, onnx_name)
                row.notes.append(f'vs PyTorch: {check["max_rel"]:.1e} rel')
                row.extra['onnx_max_rel'] = check['max_rel']
            log(f'{section}: timing {len(calls)} rows round-robin, {options.warmup} warm-up + '
                f'{options.repeats} rounds')
            with torch.no_grad():
                timings = time_interleaved(calls, options.warmup, options.repeats, device)
            base = timings[built[0][0]].median
            for name, timing in timings.items():
                row = report.row(section, name)
                row.seconds, row.seconds_min, row.speedup = timing.median, timing.min, base / timing.median
            if onnx_name:
                source, row = report.find(section, fused_name), report.find(section, onnx_name)
                row.params, row.flops = source.params, source.flops
            del calls
        del built
        gc.collect()


def run_training(report, options, log):
    """Training step of RetinaNet (training structure) with and without with_cp, each in a fresh process."""
    from .training_cost import training_cost_in_subprocess
    section = 'training step'
    kwargs = dict(shape=tuple(options.train_shape), batch=options.train_batch, steps=options.train_steps,
                  device=options.device, arch=None if options.is_recipe_backbone else options.arch,
                  act_num=None if options.is_recipe_backbone else options.act_num)
    results = {}
    for round_ in range(options.train_rounds):
        for with_cp in (False, True):
            log(f'training: RetinaNet step, with_cp={with_cp}, round {round_ + 1} of {options.train_rounds} '
                '(fresh process)')
            result = training_cost_in_subprocess(with_cp=with_cp, **kwargs)
            if with_cp in results:  # alternate the configurations, pool their steps: load drifts hit both
                result['times'] += results[with_cp]['times']
                result['peak_bytes'] = max(result['peak_bytes'], results[with_cp]['peak_bytes'])
                result['seconds'] = statistics.median(result['times'])
            results[with_cp] = result
    shape = 'x'.join(map(str, options.train_shape))
    for with_cp, result in results.items():
        row = report.row(section, f'RetinaNet, training structure, with_cp={with_cp}')
        row.seconds, row.seconds_min = result['seconds'], min(result['times'])
        row.speedup = results[False]['seconds'] / result['seconds']
        row.peak_bytes = result['peak_bytes']
        row.notes.append(f'{options.train_batch} x {shape}, AdamW (config), {len(result["times"])} steps in '
                         f'{options.train_rounds} processes; peak MiB: {result["memory"]}')
    saved = results[False]['peak_bytes'] - results[True]['peak_bytes']
    report.meta['with_cp'] = dict(saved_bytes=saved, slowdown=results[True]['seconds'] / results[False]['seconds'])
