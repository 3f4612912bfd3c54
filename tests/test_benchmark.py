"""tools/benchmark.py and mmdet_vanillanet.analysis: the tool runs (tiny sizes) and its numbers agree.

No timed assertions: timings on a shared machine prove nothing; the structure and the counts do. The
derived columns (speed-ups, GFLOP/s, the GEMM roofline) are checked on a fixed clock, whose known
seconds give known values.
"""
import importlib.util
import json
import math
import os.path as osp
import re

import pytest
import torch

from mmdet_vanillanet import cpu_support
from mmdet_vanillanet.analysis import (
    complexity,
    gemm_bound_seconds,
    gemm_throughput,
    groups,
    time_call,
    time_interleaved,
)
from mmdet_vanillanet.analysis.benchmark_models import DETECTORS, build_detector, detector_config
from mmdet_vanillanet.analysis.latency import Timing
from mmdet_vanillanet.analysis.options import FAST_ROW, TRAIN_ROW
from mmdet_vanillanet.analysis.training_cost import training_cost
from mmdet_vanillanet.models import VanillaNet

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
# vanillanet_13's block layout (so the detection configs' out_indices fit), a few channels wide
TINY_ARCH = json.dumps(dict(dims=[16, 16, 32] + [32] * 7 + [64, 64], strides=[1, 2, 2, 1, 1, 1, 1, 1, 1, 2, 1]))


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f'tool_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixed_seconds(name):
    """The seconds the fixed clock gives a row: known inputs, so every derived column has a known value."""
    if name.startswith('GEMM: torch.mm'):
        return 1.0
    for part, seconds in (('ONNX', 0.5), ('training structure', 4.0), ('fused', 1.0)):
        if part in name:
            return seconds
    return 2.0  # the oneDNN GEMM row


def fixed_clock(fns, warmup=1, repeats=5, device='cpu'):
    """``time_interleaved`` with a fixed clock: every call runs once; its times are (0.5, 1, 3) x its seconds."""
    timings = {}
    for name, fn in fns.items():
        fn()
        timings[name] = Timing([0.5 * fixed_seconds(name), fixed_seconds(name), 3 * fixed_seconds(name)])
    return timings


def run_tool(tmp_path, capsys, monkeypatch, *args):
    monkeypatch.setattr(groups, 'time_interleaved', fixed_clock)
    out = tmp_path / 'bench.json'
    load_tool('benchmark').main(['--quiet', '--shape', '64', '96', '--repeats', '1', '--warmup', '0',
                                 '--gemm-size', '500', '--arch', TINY_ARCH, '--act-num', '2', '--json', str(out),
                                 *args])
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {(r['section'], r['name']): r for r in result['rows']}
    return table, result, rows


def test_backbone_and_onnx_rows_are_consistent(tmp_path, capsys, monkeypatch):
    table, result, rows = run_tool(tmp_path, capsys, monkeypatch, '--only', 'backbone', 'onnx')
    # one table, with what reproduces it
    for needle in ('machine:', 'versions:', 'torch 2', 'load average', 'command: `python tools/benchmark.py',
                   '| section | configuration |', 'Targets:'):
        assert needle in table
    assert sum(line.startswith('|---') for line in table.splitlines()) == 1
    backbone = {name: r for (section, name), r in rows.items() if section == 'backbone'}
    train, fused = backbone[TRAIN_ROW], backbone[FAST_ROW]
    assert fused['flops'] < train['flops'] and fused['params'] < train['params']
    for name in ('fused, NCHW (plain PyTorch)', 'fused + channels_last', 'fused, ONNX Runtime (CPU)'):
        assert backbone[name]['flops'] == fused['flops'] and backbone[name]['params'] == fused['params']
    assert backbone['training structure, NCHW']['flops'] == train['flops']
    # the clock's fixed seconds give known columns: median and min, speed-ups against the training structure
    gemm = next(r for name, r in backbone.items() if name.startswith('GEMM: torch.mm'))
    assert gemm['gflops'] == pytest.approx(0.25)  # 2 x 500^3 FLOPs in 1 s
    assert (train['seconds'], train['seconds_min'], fused['seconds'], fused['seconds_min']) == (4.0, 2.0, 1.0, 0.5)
    assert fused['speedup'] == pytest.approx(4.0)
    assert backbone['fused, ONNX Runtime (CPU)']['speedup'] == pytest.approx(8.0)
    assert backbone['training structure, NCHW']['speedup'] == pytest.approx(1.0)
    assert fused['gflops'] == pytest.approx(2 * fused['flops'] / 1e9)  # 2 FLOPs per counted MAC, in 1 s
    for name, row in backbone.items():  # "x GEMM-bound" and "of GEMM" are two views of one ratio
        if not name.startswith('GEMM'):
            assert row['bound_ratio'] * row['gemm_share'] == pytest.approx(1.0), name
    assert f'{fused["bound_ratio"]:.2f}x the GEMM-bound time' in table and '4.00x faster than the training' in table
    # fusing and exporting change nothing but rounding
    for name in ('fused, NCHW (plain PyTorch)', 'fused + channels_last', FAST_ROW):
        assert backbone[name]['extra']['fused_vs_training_max_rel'] < 1e-4
    assert backbone['fused, ONNX Runtime (CPU)']['extra']['onnx_max_rel'] < 1e-4
    assert set(result['targets']) == {'bound_ratio', 'bound_ok', 'speedup', 'speedup_ok'}


def test_detector_rows_fused_counts_below_training_counts(tmp_path, capsys, monkeypatch):
    _, _, rows = run_tool(tmp_path, capsys, monkeypatch, '--only', 'complexity', 'detector', '--detectors',
                          'retinanet', '--baselines')
    train, fused = rows[('RetinaNet', 'VanillaNet, training structure')], rows[('RetinaNet', 'VanillaNet, fused')]
    assert fused['flops'] < train['flops'] and fused['params'] < train['params']
    assert (fused['seconds'], fused['speedup']) == (1.0, pytest.approx(4.0))  # against the training structure
    assert 0 < fused['extra']['series_activation_flops'] < fused['flops']
    # the same neck and head: the difference is the backbone's
    with torch.device('meta'):
        backbone = VanillaNet(arch=json.loads(TINY_ARCH), act_num=2, out_indices=(1, 8, 10))
        fused_backbone = VanillaNet(arch=json.loads(TINY_ARCH), act_num=2, out_indices=(1, 8, 10), deploy=True)
    saved = sum(p.numel() for p in backbone.parameters()) - sum(p.numel() for p in fused_backbone.parameters())
    assert train['params'] - fused['params'] == saved
@pytest.mark.parametrize('detector, paper_millions', [('retinanet', 75.4), ('mask-rcnn', 77.1)])
def test_fused_vanillanet13_detectors_have_the_papers_parameter_counts(detector, paper_millions):
    counts = {}
    for deploy in (False, True):
        with torch.device('meta'):
            model = build_detector(detector_config(detector, deploy=deploy), device='meta', init=False)
        counts[deploy] = sum(p.numel() for p in model.parameters())
    # 75,376,372 and 77,150,960: the paper's one-decimal figures (77.15M printed as 77.1M)
    assert abs(counts[True] / 1e6 - paper_millions) < 0.06
    assert counts[False] > counts[True] + 45e6  # training structure: about 123M for RetinaNet
    assert DETECTORS == ('retinanet', 'mask-rcnn')


def test_complexity_counts_macs_of_convs_and_the_depthwise_part():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    result = complexity(conv, torch.randn(1, 4, 10, 12))
    assert result == dict(flops=8 * 4 * 9 * 10 * 12, params=8 * 4 * 9, series_activation_flops=0)
    net = VanillaNet(arch=dict(dims=[8, 16], strides=[2]), act_num=1, deploy=True).eval()
    result = complexity(net, torch.randn(1, 3, 64, 64))
    stem, block, depthwise = 16 * 16 * 8 * 3 * 16, 16 * 16 * 16 * 8, (16 * 16 * 8 + 8 * 8 * 16) * 9
    assert result['series_activation_flops'] == depthwise and result['flops'] == stem + block + depthwise


def test_timing_helpers_and_gemm_throughput():
    calls = []
    timing = time_call(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(timing.times) == 3 and timing.min <= timing.median <= timing.max
    order = []
    timings = time_interleaved({'a': lambda: order.append('a'), 'b': lambda: order.append('b')}, warmup=1, repeats=2)
    assert order == ['a', 'b', 'a', 'b', 'a', 'b'] and list(timings) == ['a', 'b']
    gemm = gemm_throughput(size=128, repeats=2)
    assert gemm['gflops'] > 0 and math.isclose(gemm['gflops'], 2 * 128 ** 3 / gemm['timing'].median / 1e9)
    assert gemm_bound_seconds(1e9, 2.0) == pytest.approx(1.0)


def test_training_cost_of_one_step():
    result = training_cost(with_cp=True, shape=(32, 64), batch=1, steps=1, warmup_steps=0,
                           arch=TINY_ARCH, act_num=1)
    assert result['with_cp'] and result['seconds'] > 0 and len(result['times']) == 1
    assert result['peak_bytes'] > 0 and 'RSS' in result['memory']


@pytest.mark.slow
def test_training_group_runs_each_configuration_in_its_own_process(tmp_path, capsys, monkeypatch):
    table, result, rows = run_tool(tmp_path, capsys, monkeypatch, '--only', 'training', '--train-shape', '64', '64',
                                   '--train-batch', '1', '--train-steps', '1', '--train-rounds', '1')
    assert {name for section, name in rows if section == 'training step'} == {
        'RetinaNet, training structure, with_cp=False', 'RetinaNet, training structure, with_cp=True'}
    assert all(r['peak_bytes'] > 0 for r in rows.values())
    assert 'with_cp saves' in table and 'with_cp' in result['meta']


def precision_seconds(name):
    """A fixed clock for the precision rows: each precision's time differs, and so does each model's."""
    model = 3.0 if name.startswith('ResNet-50') else 1.0
    for part, seconds in (('OpenVINO bf16', 0.25), ('OpenVINO f32', 0.8), ('int8', 0.2), ('bf16', 0.5)):
        if part in name:
            return model * seconds
    return model * (5.0 if name.startswith('GEMM') else 2.0)


def run_precision(tmp_path, capsys, monkeypatch, *args):
    from mmdet_vanillanet.analysis import reduced_precision

    def fixed(fns, warmup, repeats):
        for fn in fns.values():
            fn()  # every call runs once: a broken row still fails
        return {name: Timing([precision_seconds(name)] * 3) for name in fns}

    monkeypatch.setattr(reduced_precision, 'time_interleaved', fixed)
    return run_tool(tmp_path, capsys, monkeypatch, '--only', 'precision', '--detectors', 'retinanet', *args)


def test_precision_rows_compare_each_model_with_itself_in_fp32(tmp_path, capsys, monkeypatch):
    table, result, rows = run_precision(tmp_path, capsys, monkeypatch, '--baselines', 'r50')
    backbone = {name: r for (section, name), r in rows.items() if section == 'reduced precision: backbone'}
    expected = {'VanillaNet-13 fused, OpenVINO f32': 2.0 / 0.8, 'ResNet-50 (channels_last), fp32': None}
    if cpu_support.native_bf16():
        expected.update({'VanillaNet-13 fused, bf16 (autocast)': 2.0 / 0.5, 'VanillaNet-13 fused, OpenVINO bf16': 8.0,
                         'ResNet-50 (channels_last), bf16 (autocast)': 2.0 / 0.5})
    if cpu_support.native_int8():
        expected['VanillaNet-13 fused, int8 (PT2E, inductor)'] = 2.0 / 0.2
    for name, speedup in expected.items():
        row = backbone[name]
        assert row['seconds'] == precision_seconds(name)
        if speedup is None:
            continue
        assert row['speedup'] == pytest.approx(speedup)  # against the same model's fp32 row
        assert re.fullmatch(r'vs fp32: \d\.\de[+-]\d\d rel', row['notes'][0])
    retinanet = {name: r for (section, name), r in rows.items() if section == 'reduced precision: RetinaNet'}
    assert {'VanillaNet-13 fused, fp32', 'ResNet-50, fp32', 'VanillaNet-13 fused, OpenVINO f32'} <= \
        set(retinanet)
    if cpu_support.native_bf16():
        assert retinanet['ResNet-50, bf16 (autocast, fp32 post-processing)']['speedup'] == pytest.approx(4.0)
        # the targets read the same rows: VanillaNet-13 / ResNet-50 is 2/6 in fp32 and 0.5/1.5 in bf16
        assert 'RetinaNet VanillaNet-13 / ResNet-50 latency: 0.33x in fp32, 0.33x in bf16' in table
        assert 'RetinaNet bf16: 4.00x faster than fp32 (target >= 3.0x: met)' in table
    if cpu_support.native_bf16() and cpu_support.native_int8():
        row = retinanet['VanillaNet-13 fused, int8 backbone (PT2E), rest bf16']
        assert row['speedup'] == pytest.approx(2.0 / 0.2) and row['notes'][0].startswith('vs fp32: ')
        assert 'RetinaNet int8 backbone, rest bf16: 10.00x faster than fp32, 0.80x the latency of OpenVINO bf16.' \
            in table
    assert 'Reduced precision on this CPU: native bf16:' in table


def test_precision_rows_say_what_this_cpu_cannot_measure(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(cpu_support.NO_NATIVE_ENV, 'bf16,int8')
    table, _, rows = run_precision(tmp_path, capsys, monkeypatch, '--baselines')
    for precision in ('bf16', 'int8'):
        row = rows[('reduced precision: backbone', f'VanillaNet-13 fused, {precision}')]
        assert row['seconds'] is None and row['notes'] == [f'not measured: no native {precision} on this CPU']
        assert rows[('reduced precision: roofline', f'GEMM {precision}')]['notes'][0].startswith('not measured')
    assert not any('bf16' in name and r['seconds'] for (_, name), r in rows.items())
    assert 'native bf16: no, native int8: no' in table
