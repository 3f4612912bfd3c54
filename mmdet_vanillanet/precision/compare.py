"""The same checkpoint in fp32, bf16 and int8: mAP, output deviation from fp32 and time per image, side by side.

What ``make demo`` reports after fusing. Each precision is evaluated by mmengine's Runner with mmdet's COCO
metric, configured exactly as ``tools/test.py --bf16`` / ``--int8`` configures it.
"""
import copy
import os.path as osp
import time
from contextlib import nullcontext

import numpy as np
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.runner import Runner

from .. import cpu_support
from ..output_comparison import detector_outputs, relative_deviation
from .bf16 import bf16_inference
from .calibration import write_int8_calibration
from .hooks import configure_test_precision

PRECISIONS = ('fp32', 'bf16', 'int8')


def batch1_dataloader(runner):
    """The runner's test dataset, one image per batch, in order."""
    return torch.utils.data.DataLoader(runner.test_dataloader.dataset, batch_size=1, shuffle=False, num_workers=0,
                                       collate_fn=pseudo_collate)


@torch.no_grad()
def seconds_per_image(model, dataloader, num_images, warmup=2, context=nullcontext):
    """Median wall time of ``model.test_step`` over the first images of a batch-1 dataloader.

    Args:
        model (torch.nn.Module): detector in eval mode.
        dataloader (torch.utils.data.DataLoader): yields batches of one image.
        num_images (int): images timed (after ``warmup`` untimed ones).
        warmup (int): images run first and not timed.
        context (callable): returns the context each call runs in (e.g. bf16 autocast).
    """
    model.eval()
    times = []
    for i, batch in enumerate(dataloader):
        if i >= warmup + num_images:
            break
        with context():
            start = time.perf_counter()
            model.test_step(batch)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return float(np.median(times))


def _first_images(model, dataloader, num_images=2):
    """The first ``num_images`` test images as one preprocessed batch: what the deviations are measured on."""
    data = pseudo_collate([dataloader.dataset[i] for i in range(num_images)])
    data = model.data_preprocessor(data, False)
    return data['inputs'], data['data_samples']


def native_precisions(precisions):
    """The precisions of ``precisions`` this CPU runs natively (fp32 always); says once what is left out."""
    native = dict(fp32=True, bf16=cpu_support.native_bf16(), int8=cpu_support.native_int8())
    unknown = set(precisions) - set(native)
    if unknown:
        raise ValueError(f'Unknown precisions {sorted(unknown)}; choose from {", ".join(PRECISIONS)}.')
    left_out = [p for p in precisions if not native[p]]
    if left_out:
        cpu_support.warn_once(f'Not measured: {", ".join(left_out)} (not native on this CPU: '
                              f'{cpu_support.describe()}).')
    return [p for p in precisions if native[p]]


def compare_precisions(config, checkpoint, work_dir, precisions=PRECISIONS, calibration_images=32, timed_images=20):
    """Evaluate one (fused) checkpoint in each precision.

    Args:
        config (str): the config file of the checkpoint (e.g. the deploy config of ``tools/deploy.py``).
        checkpoint (str): the checkpoint.
        work_dir (str): where the runs log and the int8 calibration file is written.
        precisions (Sequence[str]): of ``fp32``, ``bf16``, ``int8``; those without native support on this
            CPU are left out (said once). fp32 is always measured: it is the reference.
        calibration_images (int): training images the int8 backbone is calibrated on.
        timed_images (int): images timed per precision.

    Returns:
        dict[str, dict]: precision -> ``metrics`` (the COCO metric's), ``max_rel`` (output deviation from
        fp32 on two val images, two-stage detectors at fp32's proposals), ``seconds_per_image``; int8 also
        ``calibration`` (the file).
    """
    base = Config.fromfile(config)
    base.load_from = checkpoint
    results, reference = {}, None
    for precision in ['fp32'] + [p for p in native_precisions(precisions) if p != 'fp32']:
        cfg = copy.deepcopy(base)
        cfg.work_dir = osp.join(work_dir, precision)
        extra = {}
        if precision == 'int8':
            extra['calibration'] = osp.join(work_dir, 'int8_calibration.pth')
            write_int8_calibration(config, checkpoint, extra['calibration'], num_images=calibration_images)
        configure_test_precision(cfg, bf16=precision == 'bf16', int8=extra.get('calibration'))
        runner = Runner.from_cfg(cfg)
        metrics = runner.test()
        model = runner.model.eval()
        context = (lambda: bf16_inference(model)) if precision == 'bf16' else nullcontext
        dataloader = batch1_dataloader(runner)
        inputs, samples = _first_images(model, dataloader)
        with context():
            outputs, proposals = detector_outputs(model, inputs, samples, reference and reference[1])
        if reference is None:
            reference = (outputs, proposals)
        results[precision] = dict(metrics=metrics, max_rel=relative_deviation(reference[0], outputs)['max_rel'],
                                  seconds_per_image=seconds_per_image(model, dataloader, timed_images,
                                                                      context=context), **extra)
    return results
