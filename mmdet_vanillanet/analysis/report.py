"""The benchmark's rows and their Markdown table (header with machine, versions, load and command; targets)."""
import shlex
import sys
from dataclasses import dataclass, field

from .options import FAST_ROW, TARGET_BF16_SPEEDUP, TARGET_BOUND_RATIO, TARGET_INT8_SPEEDUP, TARGET_SPEEDUP


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


def _seconds(report, section, name):
    row = report.find(section, name)
    return row.seconds if row is not None else None


def _met(ok):
    return 'met' if ok else 'NOT met'


def precision_targets(report):
    """The reduced-precision targets on this run's ``precision`` rows, as sentences (empty where not measured)."""
    lines = []
    backbone, vanilla = 'reduced precision: backbone', 'VanillaNet-13 fused'
    fp32 = _seconds(report, backbone, f'{vanilla}, fp32')
    for name, target in (('bf16 (autocast)', TARGET_BF16_SPEEDUP), ('int8 (PT2E, inductor)', TARGET_INT8_SPEEDUP)):
        seconds = _seconds(report, backbone, f'{vanilla}, {name}')
        if fp32 and seconds:
            lines.append(f'Backbone {name}: {fp32 / seconds:.2f}x faster than fp32 (target >= {target}x: '
                         f'{_met(fp32 / seconds >= target)}).')
    for detector in ('RetinaNet', 'Mask R-CNN'):
        section = f'reduced precision: {detector}'
        seconds = {key: _seconds(report, section, name) for key, name in (
            ('v32', f'{vanilla}, fp32'), ('v16', f'{vanilla}, bf16 (autocast, fp32 post-processing)'),
            ('r32', 'ResNet-50, fp32'), ('r16', 'ResNet-50, bf16 (autocast, fp32 post-processing)'),
            ('ov16', f'{vanilla}, OpenVINO bf16'), ('v8', f'{vanilla}, int8 backbone (PT2E), rest bf16'))}
        if seconds['v32'] and seconds['v16']:
            speedup = seconds['v32'] / seconds['v16']
            lines.append(f'{detector} bf16: {speedup:.2f}x faster than fp32 (target >= {TARGET_BF16_SPEEDUP}x: '
                         f'{_met(speedup >= TARGET_BF16_SPEEDUP)}).')
        if all(seconds[k] for k in ('v32', 'v16', 'r32', 'r16')):
            before, after = seconds['v32'] / seconds['r32'], seconds['v16'] / seconds['r16']
            lines.append(f'{detector} VanillaNet-13 / ResNet-50 latency: {before:.2f}x in fp32, {after:.2f}x in bf16 '
                         f'(target: bf16 no worse than fp32: {_met(after <= before)}).')
        if seconds['v16'] and seconds['ov16']:
            ratio = seconds['v16'] / seconds['ov16']
            lines.append(f'{detector} bf16, PyTorch / OpenVINO latency: {ratio:.2f}x '
                         f'(target <= 1: {_met(ratio <= 1)}).')
        if seconds['v32'] and seconds['v8']:
            line = f'{detector} int8 backbone, rest bf16: {seconds["v32"] / seconds["v8"]:.2f}x faster than fp32'
            if seconds['ov16']:
                line += f', {seconds["v8"] / seconds["ov16"]:.2f}x the latency of OpenVINO bf16'
            lines.append(line + '.')
    return lines


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
        f'- input: {o.batch} x 3 x {h} x {w}, every row (fp32 unless the row names another precision); '
        f'backbone {o.arch} (act_num {o.act_num}), '
        f'out_indices {o.out_indices}; random weights',
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
    if 'native' in m:
        lines.append(f'Reduced precision on this CPU: {m["native"]}. Speed-up of a bf16 / int8 / OpenVINO row: '
                     'against the same model\'s fp32 row.')
        lines += precision_targets(report)
    if 'with_cp' in m:
        saved = m['with_cp']
        lines.append(f'with_cp saves {saved["saved_bytes"] / 2**20:.0f} MiB of peak memory per training step at '
                     f'{saved["slowdown"]:.2f}x the step time.')
    return '\n'.join(lines)


def command_line(argv=None):
    """The command that reproduces this run, for the table's header."""
    argv = sys.argv if argv is None else argv
    return 'python ' + shlex.join(argv)
