"""Cost of a training step: seconds per iteration and peak memory, with and without ``with_cp``.

One configuration per fresh Python process (:func:`training_cost_in_subprocess`), so that no allocator
cache or earlier peak from another configuration leaks into the figures.

Peak memory:

- CPU: the growth of the process's resident set during the steps: ``VmHWM`` (peak RSS, reset through
  ``/proc/self/clear_refs`` just before the first step) minus ``VmRSS`` at that moment. It holds what a
  step adds to the built model: the activations kept for the backward pass, the gradients, the
  optimizer's state (AdamW: two tensors per parameter), and whatever the allocator keeps.
- CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the first step (tensors
  only, not the caching allocator's reserve).

Gradients and optimizer state are the same with and without ``with_cp``: the difference between the two
rows is activation memory.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from mmengine.registry import DefaultScope

from mmdet.testing import demo_mm_inputs

from ..detectors import quiet_mmengine
from .benchmark_models import build_detector, detector_config
from .latency import synchronize


def _status_kib(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise OSError(f'{field} not in /proc/self/status')


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def training_cost(detector='retinanet', with_cp=False, shape=(320, 480), batch=2, steps=3, warmup_steps=1,
                  device='cpu', arch=None, act_num=None, seed=0):
    """Time and peak memory of training steps (forward, loss, backward, optimizer update) in this process.

    Args:
        detector (str): 'retinanet' or 'mask-rcnn' (this project's config, training structure). Default:
            'retinanet'.
        with_cp (bool): activation checkpointing in the backbone. Default: False.
        shape (tuple[int, int]): image height and width. Default: (320, 480).
        batch (int): images per step. Default: 2.
        steps (int): timed steps. Default: 3.
        warmup_steps (int): untimed steps first (their memory counts in the peak). Default: 1.
        device (str): Default: 'cpu'.
        arch, act_num: another VanillaNet (see :func:`~.benchmark_models.detector_config`). Default: the config's.
        seed (int): random seed of the weights and the synthetic batch. Default: 0.

    Returns:
        dict: ``seconds`` (median per step), ``times``, ``peak_bytes``, ``memory`` (what ``peak_bytes``
        measures), ``with_cp``, ``shape``, ``batch``, ``detector``.
    """
    from mmengine.optim import build_optim_wrapper

    with torch.random.fork_rng(devices=[]):  # seeded here; the caller's random state is restored after
        torch.manual_seed(seed)
        cfg = detector_config(detector, 'vanillanet', arch=arch, act_num=act_num, with_cp=with_cp)
        model = build_detector(cfg, device=device).train()
        with quiet_mmengine(), DefaultScope.overwrite_default_scope('mmdet'):  # the config's constructor
            optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        data = demo_mm_inputs(batch, image_shapes=[(3, *shape)] * batch, num_items=[5] * batch, num_classes=80,
                              with_mask=detector == 'mask-rcnn', device=device)
        is_cuda = torch.device(device).type == 'cuda'
        if is_cuda:
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            memory = 'CUDA max_memory_allocated growth'
        else:
            reset = _reset_peak_rss()
            base = _status_kib('VmRSS') * 1024
            memory = 'peak RSS growth' if reset else 'peak RSS growth (peak not resettable: an upper bound)'
        times = []
        for step in range(warmup_steps + steps):
            synchronize(device)
            start = time.perf_counter()
            model.train_step(data, optim_wrapper)
            synchronize(device)
            if step >= warmup_steps:
                times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated(device) if is_cuda else _status_kib('VmHWM') * 1024) - base
        return dict(seconds=statistics.median(times), times=times, peak_bytes=peak, memory=memory,
                    with_cp=with_cp, shape=list(shape), batch=batch, detector=detector)


def training_cost_in_subprocess(timeout=None, **kwargs):
    """:func:`training_cost` in a fresh Python process (same interpreter, same torch threads).

    Args:
        timeout (float | None): seconds before the child is killed.
        **kwargs: as :func:`training_cost`.
    """
    kwargs.setdefault('shape', (320, 480))
    kwargs['shape'] = list(kwargs['shape'])
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, 'result.json')
        command = [sys.executable, '-m', 'mmdet_vanillanet.analysis.training_cost', json.dumps(kwargs),
                   result_file]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0 or not os.path.isfile(result_file):
            raise RuntimeError(f'The training-cost process failed (exit {done.returncode}):\n'
                               f'{done.stderr[-3000:]}')
        with open(result_file) as f:
            return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Measure one training configuration (used by the benchmark)')
    parser.add_argument('kwargs', help='JSON keyword arguments of training_cost')
    parser.add_argument('result_file', help='where to write the measured figures (JSON)')
    args = parser.parse_args(argv)
    kwargs = json.loads(args.kwargs)
    kwargs['shape'] = tuple(kwargs.get('shape', (320, 480)))
    import mmdet_vanillanet  # noqa: F401  (registers the plugin's parts)
    result = training_cost(**kwargs)
    with open(args.result_file, 'w') as f:
        json.dump(result, f)


if __name__ == '__main__':
    main()
