"""Fuse the VanillaNet backbone of a trained detector for inference, and check that nothing changed.

    python tools/deploy.py CONFIG CHECKPOINT OUT_DIR

Writes OUT_DIR/<config name>_deploy.pth and OUT_DIR/<config name>_deploy.py (``deploy=True``), after
checking on random inputs that the detector's outputs before and after fusing agree.
"""
import argparse

import mmdet_vanillanet  # noqa: F401  (registers the plugin, installs the safe checkpoint loader)
from mmdet_vanillanet.deploy import deploy_detector


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Fuse the VanillaNet backbone of a trained detector')
    parser.add_argument('config', help='the detector config it was trained with')
    parser.add_argument('checkpoint', help='the trained checkpoint')
    parser.add_argument('out_dir', help='where to write the deploy checkpoint and config')
    parser.add_argument('--shape', type=int, nargs=2, default=[320, 320], metavar=('H', 'W'),
                        help='size of the random check images')
    parser.add_argument('--num-images', type=int, default=2, help='number of random check images')
    parser.add_argument('--tolerance', type=float, default=1e-3,
                        help='largest allowed deviation, relative to the largest output value')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    result = deploy_detector(args.config, args.checkpoint, args.out_dir, shape=tuple(args.shape),
                             num_images=args.num_images, tolerance=args.tolerance)
    print(f'fused:      {", ".join(result["fused"])} (parameters {result["params_before"]:,} -> '
          f'{result["params_after"]:,})')
    print(f'max deviation: {result["max_abs"]:.3g} absolute, {result["max_rel"]:.3g} relative '
          f'({result["num_tensors"]} output tensors, inputs {result["input_shape"]})')
    print(f'wrote:      {result["checkpoint"]}')
    print(f'            {result["config"]}')
    print(f'test it:    python tools/test.py {result["config"]} {result["checkpoint"]}')


if __name__ == '__main__':
    main()
