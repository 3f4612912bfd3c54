"""Write the synthetic COCO-format shapes dataset (images + instance json for train and val).

    python tools/make_synthetic_coco.py data/synthetic_coco --num-train 300 --num-val 100 --seed 0
"""
import argparse
import json

from mmdet_vanillanet.datasets import generate_synthetic_coco


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', nargs='?', default='data/synthetic_coco', help='dataset root')
    parser.add_argument('--num-train', type=int, default=300, help='training images')
    parser.add_argument('--num-val', type=int, default=100, help='validation images')
    parser.add_argument('--image-size', type=int, nargs='+', default=[256], metavar='PX',
                        help='side of square images, or WIDTH HEIGHT')
    parser.add_argument('--num-objects', type=int, nargs=2, default=[1, 6], metavar=('MIN', 'MAX'),
                        help='shapes placed per image')
    parser.add_argument('--object-size', type=float, nargs=2, default=[0.1, 0.4], metavar=('MIN', 'MAX'),
                        help="shape diameter as a fraction of the image's shorter side")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--force', action='store_true', help='regenerate even if a matching dataset exists')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    return parser.parse_args()


def main():
    args = parse_args()
    image_size = args.image_size[0] if len(args.image_size) == 1 else args.image_size
    paths = generate_synthetic_coco(
        args.out_dir,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=image_size,
        num_objects=tuple(args.num_objects),
        object_size=tuple(args.object_size),
        seed=args.seed,
        force=args.force,
        show_progress=not args.quiet)
    print(f'\ndataset at {paths["root"]}')
    for split in ('train', 'val'):
        with open(paths[f'{split}_ann_file']) as f:
            coco = json.load(f)
        print(f'  {split}: {len(coco["images"])} images, {len(coco["annotations"])} annotations '
              f'-> {paths[f"{split}_ann_file"]}')


if __name__ == '__main__':
    main()
