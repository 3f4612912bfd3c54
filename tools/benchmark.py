"""Benchmark VanillaNet: parameters, FLOPs, latency, the GEMM roofline, ONNX Runtime, training cost.

One run, one input, one table (Markdown, with machine, date, versions, load and this command):

    python tools/benchmark.py                                  # everything, 800x1216, batch 1, fp32, all cores
    python tools/benchmark.py --only backbone                  # training structure vs fused, same run
    python tools/benchmark.py --only backbone --shape 640 960  # the speed targets' input
    python tools/benchmark.py --device cuda                    # on a GPU (ONNX Runtime rows are CPU-only)
    python tools/benchmark.py --only precision                 # fp32 / bf16 / int8, against ResNet-50, Swin-T, OpenVINO

Every model has random weights (no download): the benchmark measures cost, not accuracy.
"""
import argparse
import json

import mmdet_vanillanet  # noqa: F401  (registers the plugin)
from mmdet_vanillanet.analysis.benchmark import run_benchmark
from mmdet_vanillanet.analysis.options import GROUPS, BenchmarkOptions
from mmdet_vanillanet.analysis.report import command_line, format_report, targets


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Benchmark VanillaNet detectors and backbones')
    parser.add_argument('--only', nargs='+', choices=GROUPS, default=list(GROUPS),
                        help='groups to run (default: all); "onnx" adds rows to "backbone" and "detector"')
    parser.add_argument('--shape', type=int, nargs=2, default=[800, 1216], metavar=('H', 'W'),
                        help='input height and width of every row (default: 800 1216)')
    parser.add_argument('--batch', type=int, default=1, help='images per forward (default: 1)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:N] (default: cpu)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s, all cores)')
    parser.add_argument('--repeats', type=int, default=5, help='timed round-robin rounds (default: 5)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed calls of each row first (default: 1)')
    parser.add_argument('--detectors', nargs='*', default=['retinanet', 'mask-rcnn'],
                        choices=['retinanet', 'mask-rcnn'],
                        help='detector sections (default: both; none: --detectors)')
    parser.add_argument('--baselines', nargs='*', default=['r50', 'swin-t'], choices=['r50', 'swin-t'],
                        help='mmdet backbones to compare with (default: r50 swin-t; none: --baselines)')
    parser.add_argument('--compile', action='store_true',
                        help='add a torch.compile (inductor, freezing) row for the fused backbone')
    parser.add_argument('--gemm-size', type=int, default=4096, help='side of the roofline GEMM (default: 4096)')
    parser.add_argument('--arch', default=None,
                        help='VanillaNet arch name or JSON dict (default: the recipe config\'s, vanillanet_13); '
                             'the configs\' out_indices stay, so a dict needs at least 11 blocks')
    parser.add_argument('--act-num', type=int, default=None,
                        help='VanillaNet act_num (default: the recipe config\'s, 4)')
    parser.add_argument('--train-shape', type=int, nargs=2, default=[320, 480], metavar=('H', 'W'),
                        help='image size of the training-step rows (default: 320 480)')
    parser.add_argument('--train-batch', type=int, default=2, help='images per training step (default: 2)')
    parser.add_argument('--train-steps', type=int, default=2,
                        help='timed training steps per process, after one untimed step (default: 2)')
    parser.add_argument('--train-rounds', type=int, default=2,
                        help='processes per configuration, alternating with/without with_cp (default: 2)')
    parser.add_argument('--onnx-dir', default=None, help='keep the ONNX files here (default: a temporary folder)')
    parser.add_argument('--json', default=None, help='also write every figure to this JSON file')
    parser.add_argument('--quiet', action='store_true', help='no progress messages')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    options = BenchmarkOptions(
        shape=tuple(args.shape), batch=args.batch, device=args.device, threads=args.threads, warmup=args.warmup,
        repeats=args.repeats, only=tuple(args.only), baselines=tuple(args.baselines),
        detectors=tuple(args.detectors), compile=args.compile, gemm_size=args.gemm_size, arch=args.arch,
        act_num=args.act_num, train_shape=tuple(args.train_shape), train_batch=args.train_batch,
        train_steps=args.train_steps, train_rounds=args.train_rounds, onnx_dir=args.onnx_dir,
        command=command_line(None if argv is None else ['tools/benchmark.py', *argv]))
    log = (lambda message: None) if args.quiet else (lambda message: print(f'[benchmark] {message}', flush=True))
    report = run_benchmark(options, log)
    print(format_report(report))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(report.as_dict(), targets=targets(report)), f, indent=1, default=str)


if __name__ == '__main__':
    main()
