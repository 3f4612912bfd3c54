"""Export a detector's fused VanillaNet backbone (or a single-stage detector's tensor outputs) to ONNX.

    python tools/export_onnx.py CONFIG OUT.onnx [--checkpoint CKPT] [--what backbone|detector]

The VanillaNet is fused first (``switch_to_deploy``; a ``deploy=True`` config and checkpoint from
tools/deploy.py work as they are). ONNX Runtime (CPU) then runs the file on a random input and must
reproduce PyTorch's outputs within ``--tolerance`` (relative to each output's largest value), or the
tool fails. Uses torch's TorchScript exporter; no extra package (the dynamo exporter would need onnxscript).
"""
import argparse

import mmdet_vanillanet  # noqa: F401  (registers the plugin, installs the safe checkpoint loader)
from mmdet_vanillanet.export import DEFAULT_OPSET, ONNXExportError, export_from_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Export the fused VanillaNet (or a RetinaNet) to ONNX')
    parser.add_argument('config', help='detector config (training or deploy structure)')
    parser.add_argument('out', help='the .onnx file to write')
    parser.add_argument('--checkpoint', help='trained or deployed checkpoint (default: random weights)')
    parser.add_argument('--what', choices=['backbone', 'detector'], default='backbone',
                        help='backbone: the fused VanillaNet, dynamic batch/height/width (default); '
                             'detector: a single-stage detector\'s head outputs, fixed shape')
    parser.add_argument('--shape', type=int, nargs=2, default=[800, 1216], metavar=('H', 'W'),
                        help='example input height and width (default: 800 1216)')
    parser.add_argument('--static', action='store_true', help='backbone: fixed input shape')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET, help=f'ONNX opset (default: {DEFAULT_OPSET})')
    parser.add_argument('--tolerance', type=float, default=1e-4,
                        help='largest relative deviation of ONNX Runtime from PyTorch (default: 1e-4)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        result = export_from_config(args.config, args.out, checkpoint=args.checkpoint, what=args.what,
                                    shape=tuple(args.shape), dynamic=not args.static, opset=args.opset,
                                    tolerance=args.tolerance)
    except ONNXExportError as error:
        raise SystemExit(f'error: {error}')
    print(f'wrote:   {result["path"]} ({args.what}, outputs {", ".join(result["outputs"])})')
    print(f'weights: {result["checkpoint"] or "random (no --checkpoint)"}')
    print(f'check:   ONNX Runtime vs PyTorch on a random {tuple(result["input_shape"])} input: '
          f'{result["max_rel"]:.2e} relative, {result["max_abs"]:.2e} absolute ({result["num_tensors"]} outputs)')


if __name__ == '__main__':
    main()
