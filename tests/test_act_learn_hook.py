"""ActLearnHook in a real mmengine Runner training a toy model around a narrow VanillaNet."""
import glob
import os.path as osp
import uuid

import pytest
import torch
import torch.nn as nn
from mmengine.hooks import EMAHook, Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import DataLoader

from mmdet.registry import HOOKS

import mmdet_vanillanet  # noqa: F401  (registration)
from mmdet_vanillanet.engine import ActLearnHook
from mmdet_vanillanet.models import VanillaNet

pytestmark = pytest.mark.usefixtures('one_thread')

ITERS_PER_EPOCH = 4  # 8 images, batch 2 (by-epoch runs)


class ToyModel(BaseModel):
    """A VanillaNet followed by a linear layer; the loss is the mean squared output."""

    def __init__(self):
        super().__init__()
        self.backbone = VanillaNet(arch=dict(dims=[8, 16, 16], strides=[2, 1]), act_num=1,
                                   out_indices=(1,))
        self.head = nn.Linear(16, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.head(self.backbone(inputs)[-1].mean((2, 3)))
        return dict(loss=out.pow(2).mean()) if mode == 'loss' else out


class Recorder(Hook):
    """Records, after each train iteration, the value the model, its blocks, EMA and log hold."""

    priority = 'LOWEST'

    def __init__(self):
        self.rows = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        backbone = runner.model.backbone
        ema = [h for h in runner.hooks if isinstance(h, EMAHook)]
        self.rows.append(dict(
            iter=runner.iter, value=backbone.act_learn,
            blocks=[block.act_learn for block in backbone.stages],
            ema=ema[0].ema_model.module.backbone.act_learn if ema else None,
            logged=runner.message_hub.get_scalar('train/act_learn').current()))


def make_runner(work_dir, hook_cfg, by_epoch=True, length=4, resume_from=None, ema=True):
    recorder = Recorder()
    # iteration-based runs get enough batches not to restart the loader (mmengine sleeps 2 s there)
    num_batches = ITERS_PER_EPOCH if by_epoch else length
    images = [dict(inputs=torch.randn(3, 16, 16)) for _ in range(2 * num_batches)]
    train_cfg = dict(by_epoch=True, max_epochs=length) if by_epoch else \
        dict(by_epoch=False, max_iters=length)
    runner = Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        experiment_name=f'act_learn_{uuid.uuid4().hex}',
        train_dataloader=DataLoader(images, batch_size=2, shuffle=False),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=train_cfg,
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=by_epoch),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[hook_cfg] + ([dict(type='EMAHook')] if ema else []) + [recorder],
        log_processor=dict(by_epoch=by_epoch),
        load_from=resume_from, resume=resume_from is not None,
        default_scope='mmdet',
        randomness=dict(seed=0))
    return runner, recorder


def expected(progress, start, end):
    return min(max((progress - start) / (end - start), 0.), 1.)


def test_registered_in_mmdet_hooks():
    assert HOOKS.get('ActLearnHook') is ActLearnHook


def test_schedule_values():
    hook = ActLearnHook(start=10, end=30, by_epoch=False)
    assert [hook.value_at(i) for i in (0, 9, 10, 15, 20, 29, 30, 31, 1000)] == \
        [0., 0., 0., 0.25, 0.5, 0.95, 1., 1., 1.]
    assert ActLearnHook(end=100).value_at(25) == 0.25  # the paper: 0 -> 1 over epochs 0 .. 100


@pytest.mark.parametrize('kwargs', [dict(start=-1, end=5), dict(start=5, end=5),
                                    dict(start=6, end=5)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match='start'):
        ActLearnHook(**kwargs)


def test_by_epoch_in_runner_with_ema_and_log(tmp_path):
    runner, recorder = make_runner(tmp_path, dict(type='ActLearnHook', start=1, end=3))
    runner.train()
    assert [r['iter'] for r in recorder.rows] == list(range(4 * ITERS_PER_EPOCH))
    for row in recorder.rows:  # interpolated within epochs: progress = iter / iters per epoch
        value = expected(row['iter'] / ITERS_PER_EPOCH, 1, 3)
        assert row['value'] == pytest.approx(value, abs=1e-12)
        assert row['blocks'] == [row['value']] * 2
        assert row['ema'] == row['value'] == row['logged']
    assert recorder.rows[6]['value'] == pytest.approx(0.25)
    assert runner.model.backbone.act_learn == 1.
    log_file, = glob.glob(osp.join(str(tmp_path), '*', '*.log'))
    with open(log_file) as f:
        assert 'act_learn: 0.3750' in f.read()  # iteration 7 = progress 1.75


def test_by_iter_in_runner(tmp_path):
    runner, recorder = make_runner(
        tmp_path, dict(type='ActLearnHook', start=2, end=6, by_epoch=False), by_epoch=False,
        length=8, ema=False)
    runner.train()
    assert [r['value'] for r in recorder.rows] == [0., 0., 0., 0.25, 0.5, 0.75, 1., 1.]


@pytest.mark.parametrize('by_epoch, total, half', [(True, 4, 2), (False, 12, 6)])
def test_resume_equals_uninterrupted(tmp_path, by_epoch, total, half):
    hook_cfg = dict(type='ActLearnHook', start=0.5 if by_epoch else 2, end=5 if by_epoch else 10,
                    by_epoch=by_epoch)
    full, full_rec = make_runner(tmp_path / 'full', hook_cfg, by_epoch, total)
    full.train()
    first, _ = make_runner(tmp_path / 'cut', hook_cfg, by_epoch, half)
    first.train()
    checkpoint = tmp_path / 'cut' / (f'epoch_{half}.pth' if by_epoch else f'iter_{half}.pth')
    resumed, resumed_rec = make_runner(tmp_path / 'cut', hook_cfg, by_epoch, total,
                                       resume_from=str(checkpoint))
    resumed.train()
    skipped = len(full_rec.rows) - len(resumed_rec.rows)
    assert skipped == (half * ITERS_PER_EPOCH if by_epoch else half)
    assert resumed_rec.rows == full_rec.rows[skipped:]
    assert 0 < resumed_rec.rows[0]['value'] < 1  # the resumed part really is mid-schedule


def test_checkpoint_keeps_mid_schedule_value(tmp_path):
    hook_cfg = dict(type='ActLearnHook', start=0, end=8)
    runner, recorder = make_runner(tmp_path, hook_cfg, length=2)
    runner.train()
    saved = torch.load(tmp_path / 'epoch_2.pth', map_location='cpu', weights_only=False)
    assert saved['meta']['act_learn'] == recorder.rows[-1]['value'] == pytest.approx(7 / 4 / 8)

    # a fresh runner (e.g. testing this checkpoint) gets the value the weights were trained with
    fresh, _ = make_runner(tmp_path / 'fresh', hook_cfg, length=2)
    assert fresh.model.backbone.act_learn == 1.
    fresh.call_hook('before_run')  # as Runner.test() does before loading; creates the EMA copy
    fresh.load_checkpoint(str(tmp_path / 'epoch_2.pth'))
    ema, = [h for h in fresh.hooks if isinstance(h, EMAHook)]
    assert fresh.model.backbone.act_learn == saved['meta']['act_learn']
    assert ema.ema_model.module.backbone.act_learn == saved['meta']['act_learn']


def test_model_without_vanillanet(tmp_path):
    runner, _ = make_runner(tmp_path, dict(type='ActLearnHook', end=2), ema=False)
    runner.model.backbone = nn.Conv2d(3, 16, 4, 4)
    with pytest.raises(RuntimeError, match='no VanillaNet'):
        runner.call_hook('before_train')


def test_deploy_backbone_only_after_the_schedule(tmp_path):
    runner, _ = make_runner(tmp_path, dict(type='ActLearnHook', end=2), ema=False)
    runner.model.backbone = VanillaNet(arch=dict(dims=[8, 16, 16], strides=[2, 1]), act_num=1,
                                       out_indices=(1,), deploy=True)
    with pytest.raises(ValueError, match='deploy'):
        runner.call_hook('before_train')
    runner.train_loop._iter = 2 * ITERS_PER_EPOCH  # schedule over: act_learn 1 is fine
    runner.call_hook('before_train')
    assert runner.model.backbone.act_learn == 1.
