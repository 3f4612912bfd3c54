"""Calibrate the int8 VanillaNet backbone of a trained detector (PT2E static quantization) and write the
calibration file that reproduces it; evaluate with ``tools/test.py CONFIG CHECKPOINT --int8 FILE``.

    python tools/quantize.py CONFIG CHECKPOINT --out work_dirs/int8_calibration.pth [--num-images 32]
"""
import argparse

import mmdet_vanillanet  # noqa: F401  (registers the plugin, installs the safe checkpoint loader)
from mmdet_vanillanet.precision.calibration import write_int8_calibration


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Calibrate an int8 VanillaNet backbone for a trained detector')
    parser.add_argument('config', help='the detector config (training or deploy form)')
    parser.add_argument('checkpoint', help='its trained or fused checkpoint')
    parser.add_argument('--out', required=True, help='calibration file to write (.pth, tensors and plain data only)')
    parser.add_argument('--num-images', type=int, default=32, help='training images to calibrate on (default: 32)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the choice of images (default: 0)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    result = write_int8_calibration(args.config, args.checkpoint, args.out, args.num_images, args.seed)
    print(f'int8 calibration written to {result["out"]} ({result["num_images"]} images; int8 backbone vs fp32 on the '
          f'first image: {result["max_rel"]:.2e} relative)')


if __name__ == '__main__':
    main()
