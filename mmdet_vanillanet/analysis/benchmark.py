"""The benchmark: one run, one input, one table (``tools/benchmark.py`` is its command line).

Groups (``--only``):

- ``complexity``: parameters and FLOPs of RetinaNet and Mask R-CNN with VanillaNet-13 (training and fused
  structure) and with mmdet's ResNet-50 and Swin-T, from mmengine's analysis tools.
- ``backbone``: the VanillaNet backbone in every form (training structure, fused NCHW, fused +
  channels_last, fused through oneDNN's blocked layout, optionally ``torch.compile``), timed round-robin
  with a large ``torch.mm`` (the GEMM roofline) so that load drifts hit every row alike.
- ``detector``: the same detectors' ``mode='tensor'`` forward (backbone, neck, head; Mask R-CNN with its
  proposals and RoI heads), fused VanillaNet against the training structure, ResNet-50 and Swin-T.
- ``onnx``: the fused backbone and the fused RetinaNet through ONNX Runtime (CPU): latency (in the
  backbone and RetinaNet sections) and deviation from PyTorch.
- ``training``: a RetinaNet training step (training structure) with and without ``with_cp``: seconds per
  iteration and peak memory, each in a fresh process.
- ``precision``: fp32, bf16 and int8 side by side: GEMM roofline per precision, the fused VanillaNet and
  ResNet-50 backbones, RetinaNet and Mask R-CNN with VanillaNet-13 / ResNet-50 / Swin-T, OpenVINO f32 / bf16
  for the exported backbone and RetinaNet (:mod:`.reduced_precision`).
"""
import os

import torch

from .groups import run_backbone, run_detectors, run_training
from .machine import machine_info
from .options import GROUPS
from .reduced_precision import run_reduced_precision
from .report import Report


def run_benchmark(options, log=print):
    """Run the groups of ``options.only``; returns a :class:`Report` (see :func:`format_report`)."""
    unknown = set(options.only) - set(GROUPS)
    if unknown:
        raise ValueError(f'Unknown benchmark groups {sorted(unknown)}; choose from {", ".join(GROUPS)}.')
    if 'onnx' in options.only and not {'backbone', 'detector'} & set(options.only):
        raise ValueError('"onnx" adds ONNX Runtime rows to the "backbone" and "detector" groups: add one of them.')
    if options.threads:
        torch.set_num_threads(options.threads)
    report = Report(options)
    report.meta.update(machine_info(options.device))
    with torch.random.fork_rng(devices=[]):  # random weights from seed 0; the caller's state is restored
        torch.manual_seed(0)
        if 'backbone' in options.only:
            run_backbone(report, options, log)
        if {'complexity', 'detector'} & set(options.only):
            run_detectors(report, options, log)
        if 'training' in options.only:
            run_training(report, options, log)
        if 'precision' in options.only:
            run_reduced_precision(report, options, log)
    try:
        report.meta['load_after'] = os.getloadavg()
    except OSError:
        report.meta['load_after'] = None
    return report
