"""The benchmark: one run, one input, one table (``tools/benchmark.py`` is its command line).

Groups (``--only``):

- ``complexity``: parameters and FLOPs of RetinaNet and Mask R-CNN with VanillaNet-13 (training and fused
  structure) and with mmdet's ResNet-50 and Swin-T, from mmengine's analysis tools.
- ``backbone``: the VanillaNet backbone in every form (training structure, fused NCHW, fused +
  channels_last, fused through oneDNN's blocked layout, optionally ``torch.compile``), timed round-robin
  with a large ``torch.mm`` (the GEMM roofline) so that load drifts hit every row alike.
- ``detector``: the same detectors' ``mode='tensor'`` forward (backbone, neck, head; Mask R-CNN with its
  proposals and RoI heads), fused VanillaNet against the training structure, ResNet-50 and Swin-T.
- ``onnx``: the fused backbone and the fused RetinaNet through ONNX Runtime (CPU): latency (in the
  backbone and RetinaNet sections) and deviation from PyTorch.
- ``training``: a RetinaNet training step (training structure) with and without ``with_cp``: seconds per
  iteration and peak memory, each in a fresh process.
"""
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .complexity import complexity, detector_complexity
from .latency import time_interleaved
from .models import (BASELINE_NAMES, DETECTOR_NAMES, PAPER, build_backbone, build_detector, detector_config,
                     detector_inputs)
from .roofline import achieved_gflops, gemm_bound_seconds, gemm_flops, gemm_inputs, onednn_gemm_call

GROUPS = ('complexity', 'backbone', 'detector', 'onnx', 'training')
# Targets of the speed issue, checked (and printed) on the backbone rows.
TARGET_BOUND_RATIO = 1.3
TARGET_SPEEDUP = 1.7

FAST_ROW = 'fused, oneDNN blocked (default)'
TRAIN_ROW = 'training structure (channels_last, default)'


@dataclass
class BenchmarkOptions:
    """What to measure; see ``tools/benchmark.py --help`` for each field."""

    shape: tuple = (800, 1216)
    batch: int = 1
    device: str = 'cpu'
    threads: int = None
    warmup: int = 1
    repeats: int = 5
    only: tuple = GROUPS
    baselines: tuple = ('r50', 'swin-t')
    detectors: tuple = ('retinanet', 'mask-rcnn')
    compile: bool = False
    gemm_size: int = 4096
    arch: str = 'vanillanet_13'
    act_num: int = 4
    train_shape: tuple = (320, 480)
    train_batch: int = 2
    train_steps: int = 2
    train_rounds: int = 2
    onnx_dir: str = None
    command: str = ''


@dataclass
class Row:
    """One line of the table; ``None`` cells print as '-'."""

    section: str
    name: str
    params: int = None
    flops: int = None
    seconds: float = None
    seconds_min: float = None
    speedup: float = None
    bound_ratio: float = None
    gflops: float = None
    gemm_share: float = None
    peak_bytes: int = None
    notes: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def as_dict(self):
        return {k: v for k, v in vars(self).items()}


class Report:
    """The rows of one run, in order, addressed by ``(section, name)``."""

    def __init__(self, options):
        self.options = options
        self.rows = []
        self.meta = {}

    def row(self, section, name):
        for row in self.rows:
            if row.section == section and row.name == name:
                return row
        row = Row(section, name)
        self.rows.append(row)
        return row

    def find(self, section, name):
        return next((r for r in self.rows if r.section == section and r.name == name), None)

    def as_dict(self):
        return dict(meta=self.meta, rows=[r.as_dict() for r in self.rows])


# ---- machine and versions -----------------------------------------------------------------------------

def _cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package):
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001  (absent or unreadable: say so in the table)
        return 'absent'


def machine_info(device):
    """Date, machine, versions and load: the table's header."""
    info = dict(
        date=datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z'),
        cpu=_cpu_name(), logical_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        versions={p: _version(p) for p in ('torch', 'mmcv', 'mmdet', 'mmengine', 'onnx', 'onnxruntime')},
        onednn=torch.backends.mkldnn.is_available(), device=str(device))
    if torch.device(device).type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
        # PyTorch's defaults let cuDNN convs use TF32 while matmuls stay fp32: say which ran.
        info['tf32'] = dict(convs=torch.backends.cudnn.allow_tf32, matmul=torch.backends.cuda.matmul.allow_tf32)
    try:
        info['load_before'] = os.getloadavg()
    except OSError:
        info['load_before'] = None
    return info


# ---- groups -------------------------------------------------------------------------------------------

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
    import copy
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


def _max_rel(reference, outputs):
    worst = 0.0
    for ref, out in zip(reference, outputs):
        scale = float(ref.abs().max()) or 1.0
        worst = max(worst, float((ref.float() - out.float()).abs().max()) / scale)
    return worst


def run_backbone(report, options, log):
    """Backbone latency in every form, interleaved with the GEMM; the roofline figures."""
    device = options.device
    is_cpu = torch.device(device).type == 'cpu'
    h, w = options.shape
    x = torch.randn(options.batch, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    log(f'backbone: building {options.arch} (act_num {options.act_num}) and fusing it')
    train = build_backbone(False, options.arch, options.act_num, device=device)
    fused = _fused_copy(train)
    log('backbone: counting FLOPs (mmengine FlopAnalyzer)')
    train_cost = complexity(train, x)
    fused_cost = complexity(fused, x)
    section = 'backbone'
    a, b, out = gemm_inputs(options.gemm_size, device)
    gemm_name = f'GEMM: torch.mm {options.gemm_size}x{options.gemm_size} fp32'
    train_default = _variant(train, channels_last=train.channels_last)
    train_nchw = _variant(train, channels_last=False)
    plain = _variant(fused, channels_last=False, fast_inference=False)
    cl = _variant(fused, channels_last=True, fast_inference=False)
    fast = _variant(fused, channels_last=True, fast_inference=True)
    onednn_gemm_name = f'GEMM: oneDNN 1x1 conv, same size{" (blocked layout)" if is_cpu else ""}'
    calls = {
        gemm_name: lambda: torch.mm(a, b, out=out),
        onednn_gemm_name: onednn_gemm_call(options.gemm_size, device),
        TRAIN_ROW: lambda: train_default(x),
        'training structure, NCHW': lambda: train_nchw(x),
        'fused, NCHW (plain PyTorch)': lambda: plain(x),
        'fused + channels_last': lambda: cl(x),
    }
    if is_cpu:
        calls[FAST_ROW] = lambda: fast(x)
    notes, extras = {}, {}
    with torch.no_grad():  # the fused forms compute the training structure's function
        reference = train(x)
        for name in ('fused, NCHW (plain PyTorch)', 'fused + channels_last', FAST_ROW):
            if name in calls:
                deviation = _max_rel(reference, calls[name]())
                notes[name] = [f'= training structure within {deviation:.1e} rel']
                extras[name] = dict(fused_vs_training_max_rel=deviation)
    if options.compile:
        name = 'fused + torch.compile (inductor, freezing)'
        compiled_net = _fused_copy(train, channels_last=True, fast_inference=False)
        log('backbone: torch.compile (inductor, freezing) ...')
        start = time.perf_counter()
        with _inductor_freezing(), torch.no_grad():
            compiled = torch.compile(compiled_net)
            compiled_out = compiled(x)
        notes[name] = [f'compile {time.perf_counter() - start:.0f} s',
                       f'vs eager: {_max_rel(reference, compiled_out):.1e} rel']

        def run_compiled():
            with _inductor_freezing():
                return compiled(x)
        calls[name] = run_compiled
    session = None
    if 'onnx' in options.only and is_cpu:
        name = 'fused, ONNX Runtime (CPU)'
        session, check = _backbone_onnx(fused, x, options, log)
        notes[name] = [f'vs PyTorch: {check["max_rel"]:.1e} rel']
        extras[name] = dict(onnx_max_rel=check['max_rel'])
        x_numpy = x.cpu().numpy()
        calls[name] = lambda: session.run(None, {'input': x_numpy})
    log(f'backbone: timing {len(calls)} rows round-robin, {options.warmup} warm-up + {options.repeats} rounds')
    with torch.no_grad():
        timings = time_interleaved(calls, options.warmup, options.repeats, device)
    gemm = timings.pop(gemm_name)
    gemm_gflops = gemm_flops(options.gemm_size) / gemm.median / 1e9
    row = report.row(section, gemm_name)
    row.seconds, row.seconds_min, row.gflops, row.gemm_share = gemm.median, gemm.min, gemm_gflops, 1.0
    row.notes.append(f'{gemm_flops(options.gemm_size) / 1e9:.0f} GFLOP per call; the roofline')
    report.meta['gemm_gflops'] = gemm_gflops
    onednn_gemm = timings.pop(onednn_gemm_name)
    row = report.row(section, onednn_gemm_name)
    row.seconds, row.seconds_min = onednn_gemm.median, onednn_gemm.min
    row.gflops = gemm_flops(options.gemm_size) / onednn_gemm.median / 1e9
    row.gemm_share = row.gflops / gemm_gflops
    row.notes.append('the kernel of the fused 1x1 convs, for reference')
    base = timings[TRAIN_ROW].median
    for name, timing in timings.items():
        cost = train_cost if name.startswith('training') else fused_cost
        row = report.row(section, name)
        row.params, row.flops = cost['params'], cost['flops']
        row.seconds, row.seconds_min = timing.median, timing.min
        row.speedup = base / timing.median
        row.bound_ratio = timing.median / gemm_bound_seconds(cost['flops'], gemm_gflops)
        row.gflops = achieved_gflops(cost['flops'], timing.median)
        row.gemm_share = row.gflops / gemm_gflops
        row.notes += notes.get(name, [])
        row.extra.update(extras.get(name, {}))
    report.meta['backbone'] = dict(train=train_cost, fused=fused_cost,
                                   gemm_bound_s=gemm_bound_seconds(fused_cost['flops'], gemm_gflops))
    del train, fused, session
    gc.collect()


def _backbone_onnx(fused, x, options, log):
    from ..export import check_onnx, export_backbone, onnx_session
    with _onnx_dir(options) as folder:
        path = os.path.join(folder, 'vanillanet_backbone_fused.onnx')
        log(f'onnx: exporting the fused backbone to {path}')
        export_backbone(fused, path, tuple(x.shape))
        session = onnx_session(path)
        check = check_onnx(session, fused, x)
    return session, check


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
    kwargs = dict(arch=options.arch if options.arch != 'vanillanet_13' else None,
                  act_num=options.act_num if options.act_num != 4 else None)
    arch = 'VanillaNet-13' if options.arch == 'vanillanet_13' else 'VanillaNet'
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
            session = onnx_name = None
            if 'onnx' in options.only and detector == 'retinanet' and is_cpu:
                session, onnx_name, check = _detector_onnx(fused_model, inputs, options, log)
                x_numpy = inputs.cpu().numpy()
                calls[onnx_name] = lambda: session.run(None, {'input': x_numpy})
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
            del calls, session
        del built
        gc.collect()


def _detector_onnx(model, inputs, options, log):
    from ..export import DetectorTensorOutputs, check_onnx, export_detector, onnx_session
    with _onnx_dir(options) as folder:
        path = os.path.join(folder, 'retinanet_vanillanet_fused.onnx')
        log(f'onnx: exporting the fused RetinaNet (tensor outputs) to {path}')
        export_detector(model, path, tuple(inputs.shape))
        session = onnx_session(path)
        check = check_onnx(session, DetectorTensorOutputs(model), inputs)
    return session, 'fused, ONNX Runtime (CPU), tensor outputs', check


def run_training(report, options, log):
    """Training step of RetinaNet (training structure) with and without with_cp, each in a fresh process."""
    from .training_cost import training_cost_in_subprocess
    section = 'training step'
    kwargs = dict(shape=tuple(options.train_shape), batch=options.train_batch, steps=options.train_steps,
                  device=options.device, arch=options.arch if options.arch != 'vanillanet_13' else None,
                  act_num=options.act_num if options.act_num != 4 else None)
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


def run_benchmark(options, log=print):
    """Run the groups of ``options.only``; returns a :class:`Report` (see :func:`format_report`)."""
    unknown = set(options.only) - set(GROUPS)
    if unknown:
        raise ValueError(f'Unknown benchmark groups {sorted(unknown)}; choose from {", ".join(GROUPS)}.')
    if 'onnx' in options.only and not {'backbone', 'detector'} & set(options.only):
        raise ValueError('"onnx" adds ONNX Runtime rows to the "backbone" and "detector" groups: add one of them.')
    if options.threads:
        torch.set_num_threads(options.threads)
    report = Report(options)
    report.meta.update(machine_info(options.device))
    torch.manual_seed(0)
    if 'backbone' in options.only:
        run_backbone(report, options, log)
    if {'complexity', 'detector'} & set(options.only):
        run_detectors(report, options, log)
    if 'training' in options.only:
        run_training(report, options, log)
    try:
        report.meta['load_after'] = os.getloadavg()
    except OSError:
        report.meta['load_after'] = None
    return report


# ---- the table ----------------------------------------------------------------------------------------

def _fmt(value, kind):
    if value is None:
        return '-'
    if kind == 'M':
        return f'{value / 1e6:.2f}'
    if kind == 'G':
        return f'{value / 1e9:.1f}'
    if kind == 's':
        return f'{value:.3f}' if value < 10 else f'{value:.1f}'
    if kind == 'x':
        return f'{value:.2f}x'
    if kind == '%':
        return f'{100 * value:.0f}%'
    if kind == 'MiB':
        return f'{value / 2**20:.0f}'
    return f'{value:.1f}'


def targets(report):
    """The speed targets, evaluated on this run's backbone rows (None where not measured)."""
    fast = report.find('backbone', FAST_ROW)
    if fast is None or fast.seconds is None:
        return None
    return dict(bound_ratio=fast.bound_ratio, bound_ok=fast.bound_ratio <= TARGET_BOUND_RATIO,
                speedup=fast.speedup, speedup_ok=fast.speedup >= TARGET_SPEEDUP)


def format_report(report):
    """The run as Markdown: a header (machine, date, versions, load, command), one table, the targets."""
    o, m = report.options, report.meta
    h, w = o.shape
    load = lambda value: ', '.join(f'{v:.2f}' for v in value) if value else 'n/a'  # noqa: E731
    versions = ', '.join(f'{k} {v}' for k, v in m['versions'].items())
    lines = [
        f'VanillaNet benchmark, {m["date"]}',
        '',
        f'- machine: {m["cpu"]}, {m["logical_cpus"]} logical CPUs, torch threads {m["torch_threads"]}'
        + (f', GPU {m["gpu"]} (TF32: convs {m["tf32"]["convs"]}, matmul {m["tf32"]["matmul"]})' if 'gpu' in m
           else '') + f'; device {m["device"]}',
        f'- versions: Python {m["python"]}, {versions}',
        f'- input: {o.batch} x 3 x {h} x {w}, fp32, every row; backbone {o.arch} (act_num {o.act_num}), '
        f'out_indices (1, 8, 10); random weights',
        f'- load average (1, 5, 15 min): before {load(m.get("load_before"))}, after {load(m.get("load_after"))}',
        f'- command: `{o.command or "python tools/benchmark.py"}`',
        '',
        '| section | configuration | params (M) | GFLOPs | median s | min s | speed-up | x GEMM-bound '
        '| GFLOP/s | of GEMM | peak MiB | notes |',
        '|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|',
    ]
    for r in report.rows:
        cells = [r.section, r.name, _fmt(r.params, 'M'), _fmt(r.flops, 'G'), _fmt(r.seconds, 's'),
                 _fmt(r.seconds_min, 's'), _fmt(r.speedup, 'x'), _fmt(r.bound_ratio, 'x'), _fmt(r.gflops, ''),
                 _fmt(r.gemm_share, '%'), _fmt(r.peak_bytes, 'MiB'), '; '.join(r.notes)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += [
        '',
        'GFLOPs: mmengine FlopAnalyzer, one multiply-add = 1 FLOP (MACs), convs/linears/matmuls/norms; '
        'GFLOP/s and the GEMM columns count 2 FLOPs per multiply-add. median/min: seconds per forward over '
        f'{o.repeats} round-robin rounds after {o.warmup} warm-up. speed-up: against the section\'s first '
        'model row (backbone: the training structure; detectors: VanillaNet training structure; training '
        'step: with_cp=False). x GEMM-bound: median / (2 x MACs / GEMM GFLOP/s).',
    ]
    result = targets(report)
    if result:
        lines.append(
            f'Targets: fused (default) = {result["bound_ratio"]:.2f}x the GEMM-bound time '
            f'(target <= {TARGET_BOUND_RATIO}x: {"met" if result["bound_ok"] else "NOT met"}); '
            f'{result["speedup"]:.2f}x faster than the training structure '
            f'(target >= {TARGET_SPEEDUP}x: {"met" if result["speedup_ok"] else "NOT met"}).')
    if 'with_cp' in m:
        saved = m['with_cp']
        lines.append(f'with_cp saves {saved["saved_bytes"] / 2**20:.0f} MiB of peak memory per training step at '
                     f'{saved["slowdown"]:.2f}x the step time.')
    return '\n'.join(lines)


def command_line(argv=None):
    """The command that reproduces this run, for the table's header."""
    argv = sys.argv if argv is None else argv
    return 'python ' + shlex.join(argv)
