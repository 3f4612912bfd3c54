"""Evaluate a detector checkpoint: the flags of mmdet's tools/test.py, with the VanillaNet plugin imported."""
import argparse

from mmdet.engine.hooks.utils import trigger_visualization_hook
from mmdet.evaluation import DumpDetResults

import mmdet_vanillanet  # noqa: F401  (registers the plugin, installs the safe checkpoint loader)
from mmdet_vanillanet.engine import StrictLoadHook
from mmdet_vanillanet.precision import configure_test_precision
from mmdet_vanillanet.tool_setup import (
    add_precision_args,
    add_runner_args,
    build_runner,
    load_config,
    set_test_checkpoint,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and evaluate) a detector')
    parser.add_argument('config', help='test config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='dump predictions to this .pkl file (mmdet DumpDetResults)')
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument('--show-dir', help='save drawn predictions under work_dir/<timestamp>/SHOW_DIR')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds each shown image stays')
    return add_precision_args(add_runner_args(parser)).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args, splits=('test',))
    set_test_checkpoint(cfg, args.checkpoint)
    configure_test_precision(cfg, bf16=args.bf16, int8=args.int8)
    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)
    runner = build_runner(cfg)
    # runner.test() loads load_from after every hook's before_run; this hook makes that load strict
    runner.register_hook(StrictLoadHook(source=args.checkpoint))
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError(f'--out must name a .pkl file, got {args.out!r}.')
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    runner.test()


if __name__ == '__main__':
    main()
