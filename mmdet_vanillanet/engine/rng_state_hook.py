"""Exact resume: the random streams of a training run continue after a restart as if it never stopped.

mmengine stores the seed in a checkpoint, not the random streams, so a run resumed from an epoch
checkpoint draws other augmentations (and other random samples in the heads) than the uninterrupted
run. :class:`RandomStateHook` closes that gap for the three places where training draws random numbers:

- the main process (python ``random``, numpy, torch CPU and CUDA): their states at the end of every
  training epoch are kept, stored in the checkpoint (one entry per rank) and set again at the start of
  the next epoch, in the uninterrupted run too, so that validation in between changes nothing;
- the train loader itself: it draws the base seed of its workers from its own generator instead of the
  torch stream, because a resumed run starts its workers at a later epoch than the uninterrupted one;
- the data-loader workers: a persistent worker's stream depends on how many epochs it has lived, which a
  restart cannot reproduce. Each worker therefore reseeds python, numpy and torch at its first sample of
  every epoch from ``(seed, rank, worker id, epoch)``; a worker of the uninterrupted run and a fresh worker
  of the resumed run then draw the same numbers.

On resume, the train sampler also gets the seed of the checkpoint back (mmengine builds it before it
restores the seed of a run without a fixed one), unless ``randomness.diff_rank_seed`` is set.

Exact for checkpoints written at the end of an epoch (mmengine's default ``by_epoch`` checkpoints and
``save_best`` ones). A checkpoint written mid-epoch carries no random states (other ranks cannot be
asked for theirs at that point); resuming from one continues with the seed, as mmengine does.
"""
import logging
import random
from typing import List, Optional

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log
from torch.utils.data import get_worker_info

from mmdet.registry import HOOKS

META_KEY = 'random_states'

# Epoch for which this (worker) process last reseeded its streams; one value per process.
_reseeded_epoch: Optional[int] = None


def capture_random_states() -> dict:
    """States of this process's python, numpy, torch CPU and (initialised) CUDA generators.

    Returns:
        dict: ``python``, ``numpy``, ``torch``, ``cuda``; plain data and tensors only, so that the
        checkpoint holding it loads with ``weights_only=True``.
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return dict(
        python=(version, list(internal), gauss),
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                   has_gauss=int(has_gauss), cached_gaussian=float(cached_gaussian)),
        torch=torch.get_rng_state(),
        cuda=cuda)


def restore_random_states(states: dict) -> None:
    """Set this process's generators to states from :func:`capture_random_states`.

    Args:
        states (dict): as returned by :func:`capture_random_states`. CUDA states are set only when
            as many CUDA devices are visible as were when they were captured.
    """
    version, internal, gauss = states['python']
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states['numpy']
    np.random.set_state((numpy_state['kind'], numpy_state['keys'].numpy().astype(np.uint32), numpy_state['pos'],
                         numpy_state['has_gauss'], numpy_state['cached_gaussian']))
    torch.set_rng_state(states['torch'])
    if states['cuda'] and torch.cuda.is_available() and torch.cuda.device_count() == len(states['cuda']):
        torch.cuda.set_rng_state_all(states['cuda'])


def reseed(*entropy: int) -> None:
    """Seed python, numpy and torch of this process from a tuple of non-negative integers.

    Args:
        *entropy (int): e.g. ``(seed, rank, worker_id, epoch)``; mixed by :class:`numpy.random.SeedSequence`.
    """
    words = [int(w) for w in np.random.SeedSequence(list(entropy)).generate_state(4)]
    random.seed(words[0] << 32 | words[1])
    np.random.seed(words[:2])
    torch.manual_seed(words[2] << 32 | words[3])


class EpochSeededPipeline:
    """A dataset pipeline whose data-loader worker reseeds its random streams at every new epoch.

    In a worker process the first sample of each epoch reseeds python, numpy and torch from
    ``(seed, rank, worker id, epoch)``; in the main process (``num_workers=0``) it only runs the pipeline.

    Args:
        pipeline (callable): the dataset's pipeline (an mmcv ``Compose``); its attributes stay readable
            through this wrapper.
        seed (int): the run's seed.
        rank (int): the process's rank.
        epoch (torch.Tensor): a 0-dim int64 tensor in shared memory that the hook sets to the current
            epoch before the epoch's first index reaches a worker.
    """

    def __init__(self, pipeline, seed: int, rank: int, epoch: torch.Tensor):
        self.pipeline = pipeline
        self.seed = seed
        self.rank = rank
        self.epoch = epoch

    def __call__(self, results):
        global _reseeded_epoch
        worker = get_worker_info()
        if worker is not None and _reseeded_epoch != int(self.epoch):
            _reseeded_epoch = int(self.epoch)
            reseed(self.seed % 2**32, self.rank, worker.id, _reseeded_epoch)
        return self.pipeline(results)

    def __getattr__(self, name):
        if name.startswith('__') or name == 'pipeline':  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.pipeline, name)

    def __repr__(self):
        return f'{type(self).__name__}({self.pipeline!r})'


def _datasets(dataset):
    """The dataset and every dataset a wrapper (Concat, Repeat, ClassBalanced, ...) holds."""
    yield dataset
    for inner in [getattr(dataset, 'dataset', None)] + list(getattr(dataset, 'datasets', None) or []):
        if inner is not None:
            yield from _datasets(inner)


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Make a resumed training draw exactly the random numbers of an uninterrupted one (see the module doc).

    With ``randomness=dict(seed=..., deterministic=True)``, a run killed after an epoch checkpoint and
    resumed with ``--resume`` ends with weights identical, bit for bit, to the uninterrupted run's (on
    hardware whose kernels are deterministic). Add it to ``custom_hooks``; it takes no arguments. It changes
    the random streams of uninterrupted runs as well (workers reseeded per epoch, validation no longer
    shifting the training stream), so results differ from a run without it with the same seed.

    Priority ``VERY_HIGH``: the states are taken at the end of an epoch before other hooks (the checkpoint
    and validation) run, and set at the start of the next before other hooks draw from them.
    """

    priority = 'VERY_HIGH'

    def __init__(self):
        self._snapshot: Optional[dict] = None  # {'iter': int, 'ranks': [states of each rank]}
        self._epoch: Optional[torch.Tensor] = None

    def before_train(self, runner) -> None:
        # created before the workers start, so that they share it
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        loader = runner.train_dataloader
        loader.generator = torch.Generator().manual_seed(runner.seed)
        # mmengine builds the sampler before a resume restores the seed of a run without a fixed one
        sampler = getattr(loader.batch_sampler, 'sampler', loader.sampler)
        if hasattr(sampler, 'seed') and not runner.cfg.get('randomness', {}).get('diff_rank_seed', False):
            sampler.seed = runner.seed
        if not loader.num_workers:
            return
        rank, _ = get_dist_info()
        wrapped = 0
        for dataset in _datasets(loader.dataset):
            pipeline = getattr(dataset, 'pipeline', None)
            if callable(pipeline) and not isinstance(pipeline, EpochSeededPipeline):
                dataset.pipeline = EpochSeededPipeline(pipeline, runner.seed, rank, self._epoch)
                wrapped += 1
        if not wrapped:
            print_log('RandomStateHook: the train dataset has no pipeline to wrap, so its data-loader workers are '
                      'not reseeded per epoch; a resumed run may draw other augmentations.',
                      logger='current', level=logging.WARNING)

    def before_train_epoch(self, runner) -> None:
        self._epoch.fill_(runner.epoch)
        if self._snapshot is None or self._snapshot['iter'] != runner.iter:
            return
        rank, world_size = get_dist_info()
        states: List[dict] = self._snapshot['ranks']
        if len(states) != world_size:
            print_log(f'RandomStateHook: the checkpoint holds the random states of {len(states)} processes, this '
                      f'run has {world_size}; the random streams continue from the seed instead.',
                      logger='current', level=logging.WARNING)
        else:
            restore_random_states(states[rank])
        self._snapshot = None

    def after_train_epoch(self, runner) -> None:
        self._snapshot = dict(iter=runner.iter, ranks=all_gather_object(capture_random_states()))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._snapshot is not None and self._snapshot['iter'] == runner.iter:
            checkpoint.setdefault('meta', {})[META_KEY] = self._snapshot

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # Used only if training continues from exactly this point (a resume), see before_train_epoch.
        self._snapshot = checkpoint.get('meta', {}).get(META_KEY)
