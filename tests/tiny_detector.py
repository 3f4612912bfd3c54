"""Plain helpers shared by tests: a tiny synthetic COCO set, a complete tiny detector config (and its model
alone), tool runners, the lines that retrain a demo config, random BN statistics.

Not a test module (no ``test_`` prefix); the test files import it (pytest puts tests/ on ``sys.path``).
"""
import importlib.util
import os
import os.path as osp
import subprocess
import sys

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from mmdet_vanillanet.datasets import generate_synthetic_coco, synthetic_coco_metainfo

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

HEADS = {
    'retina': """dict(type='RetinaHead', num_classes=5, in_channels=16, feat_channels=16, stacked_convs=1,
        anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4, scales_per_octave=1, ratios=[1.0],
                              strides=[8, 16, 32]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0))""",
    # FCOS averages its losses over the positives of all processes (reduce_mean): a distributed run
    # computes the gradient of a single-process run with the same total batch.
    'fcos': """dict(type='FCOSHead', num_classes=5, in_channels=16, feat_channels=16, stacked_convs=1,
        strides=[8, 16, 32], regress_ranges=((-1, 32), (32, 64), (64, 1e8)), norm_cfg=None,
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='IoULoss', loss_weight=1.0),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0))""",
}
TRAIN_CFGS = {
    'retina': """dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0),
        sampler=dict(type='PseudoSampler'), allowed_border=-1, pos_weight=-1, debug=False)""",
    'fcos': 'None',
}

MODEL = """model = dict(
    type={detector!r},
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True, pad_size_divisor=32),
    backbone={backbone},
    neck=dict(type='FPN', in_channels=[16, 24, 32], out_channels=16, start_level=0, num_outs=3),
    bbox_head={head},
    train_cfg={train_cfg},
    test_cfg=dict(nms_pre=100, min_bbox_size=0, score_thr=0.0, nms=dict(type='nms', iou_threshold=0.5),
                  max_per_img=20))"""
BACKBONE = """dict(type='VanillaNet', arch=dict(dims=[8, 16, 24, 32], strides=[2, 2, 2]), act_num=1,
                  out_indices=(0, 1, 2), norm_cfg={norm_cfg!r}, norm_eval={norm_eval!r})"""

CONFIG = """
custom_imports = dict(imports=['mmdet_vanillanet'], allow_failed_imports=False)
default_scope = 'mmdet'
data_root = {data_root!r}
metainfo = {metainfo!r}
{model}
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='RandomFlip', prob={flip_prob}),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size={batch_size}, num_workers={num_workers}, persistent_workers={persistent_workers},
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type='CocoDataset', data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                 filter_cfg=dict(filter_empty_gt=True), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CocoDataset', data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                 test_mode=True, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=data_root + '/annotations/instances_val.json', metric='bbox')
test_evaluator = val_evaluator
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs={max_epochs}, val_interval={val_interval})
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4)]
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=1),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1),
    sampler_seed=dict(type='DistSamplerSeedHook'))
custom_hooks = {custom_hooks!r}
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0, deterministic=True)
log_level = 'INFO'
"""


def make_data(root, **kwargs):
    """Write (once) a tiny synthetic COCO set under ``root``: 8 train and 4 val images of 64x64 by default.

    Args:
        root (str): folder.
        **kwargs: more arguments of :func:`generate_synthetic_coco`.

    Returns:
        str: ``root``.
    """
    generate_synthetic_coco(str(root), **{**dict(num_train=8, num_val=4, image_size=64, show_progress=False),
                                          **kwargs})
    return str(root)


def model_config(backbone, head='retina'):
    """The tiny detector's ``model = dict(...)`` config line.

    Args:
        backbone (str): config text of a VanillaNet dict with outputs of 16/24/32 channels at strides 8/16/32.
        head (str): 'retina' (RetinaNet) or 'fcos' (FCOS).
    """
    return MODEL.format(detector={'retina': 'RetinaNet', 'fcos': 'FCOS'}[head], backbone=backbone, head=HEADS[head],
                        train_cfg=TRAIN_CFGS[head])


def write_config(path, data_root, head='retina', num_workers=0, persistent_workers=False, batch_size=2,
                 max_epochs=2, val_interval=1, flip_prob=0.5, norm_cfg=None, norm_eval=False,
                 custom_hooks=({'type': 'RandomStateHook'},)):
    """Write a complete tiny detector config (train, val and test) and return its path.

    Args:
        path (str | Path): the config file to write (``.py``).
        data_root (str): the synthetic data of :func:`make_data`.
        head (str): 'retina' (RetinaNet) or 'fcos' (FCOS).
        num_workers (int): train loader workers.
        persistent_workers (bool): keep train loader workers between epochs.
        batch_size (int): train images per process and step.
        max_epochs (int): training epochs (a checkpoint after each).
        val_interval (int): validate every this many epochs.
        flip_prob (float): probability of the random flip in the train pipeline.
        norm_cfg (dict | None): the backbone's norm layers (None: its default BN).
        norm_eval (bool): keep the backbone's BN layers in eval mode.
        custom_hooks (Sequence[dict]): the config's ``custom_hooks``.
    """
    backbone = BACKBONE.format(norm_cfg=norm_cfg or dict(type='BN', eps=1e-6), norm_eval=norm_eval)
    text = CONFIG.format(
        data_root=str(data_root), metainfo=synthetic_coco_metainfo(), model=model_config(backbone, head),
        num_workers=num_workers, persistent_workers=persistent_workers, batch_size=batch_size,
        max_epochs=max_epochs, val_interval=val_interval, flip_prob=flip_prob, custom_hooks=list(custom_hooks))
    with open(path, 'w') as f:
        f.write(text)
    return str(path)


def tool_env(**extra):
    """Environment for tool subprocesses: one thread each (tiny tensors; a shared 2-core machine)."""
    return dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=ROOT, **extra)


def run_tool(tool, *args, timeout=300, **popen_kwargs):
    """Run ``tools/<tool>`` with the test's Python; returns the ``CompletedProcess`` (text, captured).

    Args:
        tool (str): file name in ``tools/``, e.g. ``'train.py'``.
        *args (str): its arguments.
        timeout (float): seconds.
    """
    return subprocess.run([sys.executable, osp.join(ROOT, 'tools', tool), *map(str, args)], cwd=ROOT,
                          env=tool_env(), capture_output=True, text=True, timeout=timeout, **popen_kwargs)


def load_tool(tool):
    """Import ``tools/<tool>.py`` as a module, to call its ``main(argv)`` in this process (no start-up cost).

    Args:
        tool (str): name without ``.py``, e.g. ``'train'``.
    """
    spec = importlib.util.spec_from_file_location(f'tools_{tool}', osp.join(ROOT, 'tools', f'{tool}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(path, *args):
    """Run a Python script (e.g. one of mmdet's tools) in this process as ``python path args`` would run it:
    ``__name__ == '__main__'`` and ``sys.argv == [path, *args]``. matplotlib's settings (which mmdet's plotting
    tools change: seaborn's style) and figures are left as they were.

    Args:
        path (str | Path): the script.
        *args: its arguments.
    """
    import runpy

    import matplotlib
    import matplotlib.pyplot as plt
    argv = sys.argv
    sys.argv = [str(path), *map(str, args)]
    try:
        with matplotlib.rc_context():
            runpy.run_path(str(path), run_name='__main__')
    finally:
        sys.argv = argv
        plt.close('all')


def run_together(commands, timeout, envs=None, **popen_kwargs):
    """Start every command at once (the ranks of one job), wait for all, fail the test if one hangs or fails.

    Args:
        commands (Sequence[list[str]]): one argument list per process.
        timeout (float): seconds for all of them; a hang fails the test instead of blocking the suite.
        envs (Sequence[dict] | None): one environment per process (e.g. each rank's), or None.
        **popen_kwargs: for every ``subprocess.Popen`` (``env``, ``cwd``, ...).

    Returns:
        list[str]: each process's output (stdout and stderr).
    """
    import pytest
    envs = envs or [popen_kwargs.pop('env', None)] * len(commands)
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                  **popen_kwargs) for command, env in zip(commands, envs)]
    try:
        logs = [process.communicate(timeout=timeout)[0] for process in processes]
    except subprocess.TimeoutExpired:
        pytest.fail(f'{len(processes)} processes did not finish within {timeout} s (a hang)')
    finally:
        for process in processes:
            process.kill()
    codes = [process.returncode for process in processes]
    assert codes == [0] * len(processes), f'exit codes {codes}:\n' + '\n'.join(log[-3000:] for log in logs)
    return logs


def demo_retrained(warmup_iters, log_interval):
    """Config lines that end a child of a demo config which sets its own ``data_root`` (ending in '/'),
    ``val_dataloader`` and ``max_epochs``.

    A base config is evaluated before its child, so what the demo derives from those (the test loader and
    evaluators, the schedule) must be derived again: the demo's schedule, a linear warm-up then a cosine decay
    over ``max_epochs``, with validation and the checkpoint once, at the end.

    Args:
        warmup_iters (int): iterations of the linear warm-up.
        log_interval (int): iterations between log lines.
    """
    return f"""test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end={warmup_iters}),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, eta_min_ratio=0.01,
         convert_to_iter_based=True),
]
default_hooks = dict(logger=dict(interval={log_interval}), checkpoint=dict(interval=max_epochs))
"""


def randomize_bn(net, generator):
    """Give every BN layer of ``net`` random statistics and affine parameters, as training would (in place).

    Args:
        net (torch.nn.Module): e.g. a VanillaNet.
        generator (torch.Generator): the source of the random values.
    """
    for module in net.modules():
        if isinstance(module, _BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(n, generator=generator) * 0.5 + 1)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
