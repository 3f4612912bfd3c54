"""The main job on the embedded synthetic dataset (`make demo`): train, evaluate, fuse, evaluate, show.

    python tools/demo.py [--config configs/demo/retinanet_vanillanet_demo.py] [--cfg-options ...]
"""
import argparse

from mmengine.config import DictAction

import mmdet_vanillanet  # noqa: F401  (registers the plugin, installs the safe checkpoint loader)
from mmdet_vanillanet.demo import run_demo
from mmdet_vanillanet.precision.compare import PRECISIONS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train, evaluate and fuse the demo detector on synthetic data')
    parser.add_argument('--config', default='configs/demo/retinanet_vanillanet_demo.py')
    parser.add_argument('--work-dir', help='default: work_dirs/<config name>')
    parser.add_argument('--num-train', type=int, default=600, help='synthetic training images')
    parser.add_argument('--num-val', type=int, default=100, help='synthetic validation images')
    parser.add_argument('--image-size', type=int, default=256, help='side of the synthetic images')
    parser.add_argument('--timed-images', type=int, default=20, help='images timed for inference speed')
    parser.add_argument('--precisions', nargs='+', default=list(PRECISIONS), choices=PRECISIONS,
                        help='evaluate the fused checkpoint in these precisions (default: all; bf16 and int8 only '
                             'where the CPU runs them natively, said once otherwise)')
    parser.add_argument('--calibration-images', type=int, default=32, help='training images for int8 calibration')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='config overrides, key=value')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_demo(args.config, work_dir=args.work_dir, num_train=args.num_train, num_val=args.num_val,
             image_size=args.image_size, cfg_options=args.cfg_options, timed_images=args.timed_images,
             precisions=args.precisions, calibration_images=args.calibration_images)


if __name__ == '__main__':
    main()
