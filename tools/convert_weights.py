"""Turn a published VanillaNet checkpoint into a clean backbone checkpoint for ``init_cfg``.

    python tools/convert_weights.py vanillanet_13_act_num_4_kd_pretrain.pth vanillanet_13.pth \
        [--key model_ema|model] [--deploy]

The output (``{'state_dict': ..., 'meta': ...}``, classifier dropped, optionally fused) loads with
``backbone=dict(type='VanillaNet', ..., init_cfg=dict(type='Pretrained', checkpoint=DST))``.
"""
import argparse

import mmdet_vanillanet  # noqa: F401  (registers the plugin, installs the safe checkpoint loader)
from mmdet_vanillanet.convert import convert_backbone_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Convert a VanillaNet checkpoint into a backbone checkpoint')
    parser.add_argument('src', help='published classification checkpoint (or a bare / DDP / detector one)')
    parser.add_argument('dst', help='output file')
    parser.add_argument('--key', choices=['model_ema', 'model'],
                        help='which weights to take (default: model_ema when present, else model)')
    parser.add_argument('--deploy', action='store_true',
                        help='fuse into the deploy structure (for a deploy=True backbone)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    info = convert_backbone_checkpoint(args.src, args.dst, key=args.key, deploy=args.deploy)
    size = 2 * info['act_num'] + 1 if info['act_num'] else '?'
    print(f'read:       {info["source"]}')
    print(f'arch:       {info["arch"]} ({info["num_blocks"]} blocks), act_num={info["act_num"]} '
          f'({size}x{size} activation kernels), {info["structure"]} structure')
    print(f'parameters: {info["params"]:,}')
    if info['out_structure'] != info['structure']:
        print(f'fused:      {info["out_structure"]} structure, {info["out_params"]:,} parameters')
    deploy = ', deploy=True' if info['out_structure'] == 'deploy' else ''
    print(f'wrote:      {args.dst}')
    print(f"use it as:  backbone=dict(type='VanillaNet', arch=..., act_num={info['act_num']}{deploy}, "
          f"init_cfg=dict(type='Pretrained', checkpoint='{args.dst}'))")


if __name__ == '__main__':
    main()
