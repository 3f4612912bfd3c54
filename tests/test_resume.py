"""Interrupted trainings: RandomStateHook makes a resumed run exact; --resume finds the newest complete checkpoint."""
import os
import os.path as osp
import random
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from tiny_detector import ROOT, make_data, tool_env, write_config
from torch.utils.data import Dataset

from mmdet.registry import HOOKS

import mmdet_vanillanet  # noqa: F401  (registration, safe loader)
from mmdet_vanillanet.checkpoint import load_checkpoint_file
from mmdet_vanillanet.engine.rng_state_hook import RandomStateHook, capture_random_states, restore_random_states
from mmdet_vanillanet.tool_setup import find_resume_checkpoint, set_resume

pytestmark = pytest.mark.usefixtures('one_thread')


def draws():
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_registered():
    assert HOOKS.get('RandomStateHook') is RandomStateHook


def test_random_states_survive_a_weights_only_checkpoint(tmp_path):
    np.random.randn()  # leaves a cached gaussian in numpy's state
    states = capture_random_states()
    expected = draws()
    torch.save(dict(meta=dict(random_states=states)), tmp_path / 'ckpt.pth')
    restore_random_states(load_checkpoint_file(tmp_path / 'ckpt.pth')['meta']['random_states'])
    assert draws() == expected


# ---- in a Runner: a toy model whose data and forward pass draw random numbers -----------------------


def jitter(results):
    """A 'pipeline' drawing from python, numpy and torch, as augmentations do (in the loader's workers)."""
    noise = torch.rand(4) + float(np.random.rand()) + random.random()
    return dict(inputs=results['inputs'] + noise)


class JitteredData(Dataset):

    def __init__(self):
        self.pipeline = jitter
        self.items = [torch.full((4,), i / 8) for i in range(8)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.pipeline(dict(inputs=self.items[index]))


class DropoutModel(BaseModel):
    """Draws from the main process's torch stream in every training step (dropout)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.linear(self.dropout(torch.stack(inputs)))
        return dict(loss=out.pow(2).mean()) if mode == 'loss' else out


class DrawsBetweenEpochs(Hook):
    """Draws random numbers after each epoch's checkpoint, as validation does; a resumed run skips that."""

    priority = 'LOWEST'

    def after_train_epoch(self, runner):
        draws()


class StopAtEpoch(Hook):
    """Stands in for a killed job: stops the run when ``epoch`` begins (its checkpoint is written)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def before_train_epoch(self, runner):
        if runner.epoch == self.epoch:
            raise KeyboardInterrupt


def train_toy(work_dir, hooks, resume_from=None):
    torch.manual_seed(0)  # the model is built before the Runner seeds
    runner = Runner(
        model=DropoutModel(), work_dir=str(work_dir), experiment_name=f'rng_{uuid.uuid4().hex}',
        # Persistent workers are covered by the subprocess test below: shutting them down at garbage
        # collection waits 5 s per loader here.
        train_dataloader=dict(dataset=JitteredData(), batch_size=2, num_workers=1, persistent_workers=False,
                              sampler=dict(type='DefaultSampler', shuffle=True)),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=3),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1), logger=dict(type='LoggerHook')),
        custom_hooks=hooks + [DrawsBetweenEpochs()], load_from=resume_from, resume=resume_from is not None,
        randomness=dict(seed=0, deterministic=True), default_scope='mmdet')
    try:
        runner.train()
    except KeyboardInterrupt:
        pass
    return {k: v.clone() for k, v in runner.model.state_dict().items()}


@pytest.mark.parametrize('with_hook', [True, False])
def test_resumed_runner_ends_where_the_uninterrupted_one_does(tmp_path, with_hook):
    hooks = (lambda: [RandomStateHook()]) if with_hook else list
    uninterrupted = train_toy(tmp_path / 'full', hooks())
    train_toy(tmp_path / 'cut', hooks() + [StopAtEpoch(1)])
    resumed = train_toy(tmp_path / 'cut', hooks(), resume_from=str(tmp_path / 'cut' / 'epoch_1.pth'))
    equal = all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    assert equal is with_hook  # without the hook, workers, dropout and the 'validation' draws break it


# ---- --resume: which checkpoint -----------------------------------------------------------------------


def fake_checkpoint(path, mtime):
    torch.save(dict(meta=dict(epoch=1)), path)
    os.utime(path, (mtime, mtime))
    return str(path)


def test_resume_finds_the_newest_complete_checkpoint(tmp_path):
    assert find_resume_checkpoint(str(tmp_path)) is None
    first = fake_checkpoint(tmp_path / 'epoch_1.pth', 1000)
    second = fake_checkpoint(tmp_path / 'epoch_2.pth', 2000)
    (tmp_path / 'last_checkpoint').write_text(second)
    assert find_resume_checkpoint(str(tmp_path)) == second
    # killed while writing epoch_3.pth: the file is cut short, last_checkpoint still names epoch 2
    data = open(second, 'rb').read()
    (tmp_path / 'epoch_3.pth').write_bytes(data[:len(data) // 2])
    assert find_resume_checkpoint(str(tmp_path)) == second
    # killed while writing last_checkpoint, or epoch_2.pth removed: the newest complete file
    (tmp_path / 'last_checkpoint').write_text('')
    assert find_resume_checkpoint(str(tmp_path)) == second
    os.remove(second)
    (tmp_path / 'last_checkpoint').write_text(second)
    assert find_resume_checkpoint(str(tmp_path)) == first


def test_resume_flag_on_the_first_start(tmp_path):
    """A job script passes --resume on every start: the first one starts as without it (load_from kept)."""
    start = fake_checkpoint(tmp_path / 'coco_pretrained.pth', 1000)
    cfg = Config(dict(work_dir=str(tmp_path / 'work'), load_from=start))
    set_resume(cfg, 'auto')
    assert cfg.resume is False and cfg.load_from == start
    latest = fake_checkpoint(tmp_path / 'work.pth', 2000)
    set_resume(cfg, latest)
    assert cfg.resume is True and cfg.load_from == latest


# ---- the real thing: tools/train.py killed with SIGKILL, then --resume -------------------------------


def start_training(config, work_dir):
    log = open(f'{work_dir}.log', 'a')
    return subprocess.Popen([sys.executable, osp.join(ROOT, 'tools', 'train.py'), config, '--work-dir', work_dir]
                            + (['--resume'] if osp.isdir(work_dir) else []),
                            cwd=ROOT, env=tool_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def final_weights(work_dir, epochs):
    return load_checkpoint_file(osp.join(work_dir, f'epoch_{epochs}.pth'))['state_dict']


@pytest.mark.slow
def test_killed_training_resumes_to_identical_weights(tmp_path):
    """Persistent loader workers, random flips, validation after every epoch; killed after epoch 1."""
    data_root = make_data(tmp_path / 'data')
    config = write_config(tmp_path / 'tiny.py', data_root, num_workers=1, persistent_workers=True, max_epochs=3)
    full, cut = str(tmp_path / 'full'), str(tmp_path / 'cut')

    assert start_training(config, full).wait(timeout=600) == 0, open(f'{full}.log').read()[-3000:]

    job = start_training(config, cut)
    for _ in range(12000):  # poll for the first checkpoint, at most about 10 minutes
        if osp.exists(osp.join(cut, 'last_checkpoint')) or job.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the job and its loader worker, mid-epoch 2 at the latest
    job.wait()
    assert not osp.exists(osp.join(cut, 'epoch_3.pth'))

    resumed = start_training(config, cut)
    assert resumed.wait(timeout=600) == 0, open(f'{cut}.log').read()[-3000:]
    log = open(f'{cut}.log').read()
    assert 'resumed epoch: 1, iter: 4' in log or 'resumed epoch: 2, iter: 8' in log, log[-3000:]

    expected, got = final_weights(full, 3), final_weights(cut, 3)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'
