"""Where does a detector look? Grad-CAM++ of a backbone output for its top detections, one PNG per image.

    python tools/visualize_cam.py CONFIG CHECKPOINT IMAGE [IMAGE ...] --out-dir DIR
        [--compare CONFIG2 CHECKPOINT2] [--layer NAME_OR_INDEX] [--top-k 5] [--score-thr 0.3]

With ``--compare`` each PNG shows the two models side by side, as the VanillaNet paper compares
VanillaNet-9 and ResNet-50.
"""
import argparse
import os.path as osp

from mmengine.config import DictAction

from mmdet_vanillanet.visualization import detection_cam, load_detector, resolve_layer, save_cam_figure


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Grad-CAM++ maps of a detector for its top detections')
    parser.add_argument('config', help='detector config')
    parser.add_argument('checkpoint', help='detector checkpoint')
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('--out-dir', required=True, help='where to write <image name>.png')
    parser.add_argument('--compare', nargs=2, metavar=('CONFIG2', 'CHECKPOINT2'),
                        help='a second detector, drawn next to the first')
    parser.add_argument('--layer', help='module to explain: a name from model.named_modules() (e.g. '
                        'backbone.stages.2, backbone.layer4) or an index into the backbone outputs '
                        '(default: -1, the last output)')
    parser.add_argument('--compare-layer', help='the same for the --compare detector (default: its last output)')
    parser.add_argument('--top-k', type=int, default=5, help='explain at most this many detections')
    parser.add_argument('--score-thr', type=float, default=0.3, help='explain detections scoring at least this')
    parser.add_argument('--device', default='cpu', help='e.g. cpu or cuda:0')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='overrides of the first config, key=value')
    return parser.parse_args(argv)


def output_files(images, out_dir):
    """``out_dir/<image name>.png``; names shared by several images get ``_1``, ``_2``, ..."""
    files, used = [], set()
    for image in images:
        stem = osp.splitext(osp.basename(image))[0]
        name, n = stem, 0
        while name in used:
            n += 1
            name = f'{stem}_{n}'
        used.add(name)
        files.append(osp.join(out_dir, f'{name}.png'))
    return files


def main(argv=None):
    args = parse_args(argv)
    missing = [image for image in args.images if not osp.isfile(image)]
    if missing:
        raise FileNotFoundError(f'Image(s) not found: {", ".join(missing)}')
    models = [(load_detector(args.config, args.checkpoint, args.device, args.cfg_options), args.layer)]
    if args.compare:
        models.append((load_detector(*args.compare, device=args.device), args.compare_layer))
    configs = [args.config] + ([args.compare[0]] if args.compare else [])
    titles = [osp.splitext(osp.basename(config))[0] for config in configs]
    for model, layer in models:
        resolve_layer(model, layer)  # a bad layer fails before any image is processed
    for image, out_file in zip(args.images, output_files(args.images, args.out_dir)):
        results = [detection_cam(model, image, layer, args.top_k, args.score_thr) for model, layer in models]
        save_cam_figure(results, out_file, titles)
        explained = ', '.join(f'{len(r.scores)} detection(s) at {r.layer}' for r in results)
        print(f'{out_file}: {explained}')


if __name__ == '__main__':
    main()
