"""Train a detector: the flags of mmdet's tools/train.py, with the VanillaNet plugin imported."""
import argparse

import mmdet_vanillanet  # noqa: F401  (registers the plugin, installs the safe checkpoint loader)
from mmdet_vanillanet.tool_setup import add_runner_args, build_runner, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision (CUDA)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by (total batch / auto_scale_lr.base_batch_size)')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or without a path from the newest complete one in '
                        'the work dir (none there: start from the beginning)')
    return add_runner_args(parser).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args, splits=('train', 'val'))
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise ValueError('--auto-scale-lr needs auto_scale_lr=dict(enable=..., base_batch_size=...) '
                             'in the config.')
        cfg.auto_scale_lr.enable = True
    build_runner(cfg).train()


if __name__ == '__main__':
    main()
