"""What the command-line tools share: mmdet-compatible flags, config loading, runner building.

The tools in ``tools/`` stay thin: they parse arguments and call these functions. Besides what mmdet's
tools do, these functions check the config's data before anything is built, find the checkpoint a
restarted job continues from, and let ``tools/dist_train.sh`` run on CPU-only machines (gloo).
"""
import argparse
import datetime
import glob
import logging
import os
import os.path as osp

import torch
import torch.distributed as torch_dist
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .checkpoint.pretrained import check_pretrained_init_cfg
from .checkpoint.safe_load import CheckpointReadError, check_checkpoint_file
from .datasets.config_checks import check_data_config
from .detectors import vanillanet_cfgs

# names mmengine's CheckpointHook gives checkpoints, newest first when sorted by time
CHECKPOINT_PATTERNS = ('epoch_*.pth', 'iter_*.pth', 'best_*.pth')
# norm layer types that synchronise across processes (torch's needs CUDA, mmcv's its CUDA ops)
SYNC_NORMS = ('SyncBN', 'MMSyncBN')


def add_runner_args(parser):
    """Add the flags every mmdet tool has: ``--work-dir``, ``--cfg-options``, ``--launcher``, ``--local-rank``.

    Args:
        parser (argparse.ArgumentParser): the tool's parser.
    """
    parser.add_argument('--work-dir', help='directory for logs and checkpoints '
                        '(default: work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value (e.g. model.backbone.act_num=3)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher (tools/dist_*.sh and tools/slurm_*.sh set it)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    return parser


def load_config(args, splits=()):
    """Read ``args.config``, apply ``--cfg-options``, ``--launcher`` and the work directory, check the data.

    For training (``'train'`` in ``splits``) also apply ``args.resume`` (:func:`set_resume`) and, unless a
    checkpoint replaces every weight, check that the backbone's pretrained weights exist, before the data.

    Args:
        args (argparse.Namespace): parsed arguments of :func:`add_runner_args` plus ``config`` (and
            ``resume`` for training).
        splits (Sequence[str]): the splits the tool reads (``'train'``, ``'val'``, ``'test'``): their data
            roots, image folders and annotation files are checked now (see
            :func:`mmdet_vanillanet.datasets.config_checks.check_data_config`). Default: none.
    """
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'Config file {args.config!r} does not exist; see configs/ for the ready ones.')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('work_dirs', osp.splitext(osp.basename(args.config))[0])
    if 'train' in splits:
        set_resume(cfg, getattr(args, 'resume', None))
        if not cfg.get('load_from'):
            check_training_weights(cfg)
    check_data_config(cfg, splits)
    return cfg


def check_training_weights(cfg):
    """Fail now, before any data is read, if a VanillaNet's ``init_cfg`` names a local file that is missing.

    Only training reads these (ImageNet) weights; the message says where to get them and how to point at
    them with ``--cfg-options``.

    Args:
        cfg (mmengine.Config): the training config.
    """
    for node in vanillanet_cfgs(cfg.model):
        check_pretrained_init_cfg(node.get('init_cfg'))


def drop_backbone_init_cfg(cfg, reason):
    """Remove every VanillaNet's ``init_cfg`` from ``cfg.model`` (in place) and log why; returns how many.

    Args:
        cfg (mmengine.Config): the config.
        reason (str): what replaces the weights, for the log.
    """
    nodes = [node for node in vanillanet_cfgs(cfg.get('model', {})) if node.pop('init_cfg', None) is not None]
    if nodes:
        print_log(f'{reason} replaces every weight: the backbone init_cfg (pretrained ImageNet weights) is not read.',
                  logger='current')
    return len(nodes)


def set_test_checkpoint(cfg, checkpoint):
    """Make ``cfg`` evaluate ``checkpoint``: checked now, loaded by the runner; no backbone init weights needed.

    Every VanillaNet's ``init_cfg`` is dropped: the checkpoint replaces all weights, so the ImageNet
    file the training config names need not exist on the test machine.

    Args:
        cfg (mmengine.Config): the config, changed in place.
        checkpoint (str): path (or URL) of the trained checkpoint.
    """
    if '://' not in checkpoint:
        check_checkpoint_file(checkpoint)
    cfg.load_from = checkpoint
    drop_backbone_init_cfg(cfg, f'The checkpoint {checkpoint}')


def find_resume_checkpoint(work_dir):
    """The checkpoint a restarted training continues from: the newest complete one in ``work_dir``.

    That is the one mmengine's ``last_checkpoint`` file names, unless that file is empty or names a
    missing or incomplete checkpoint (a job killed while writing either); then the newest complete
    ``epoch_*``, ``iter_*`` or ``best_*`` checkpoint, with a warning. Incomplete files are skipped.

    Args:
        work_dir (str): the training's work directory.

    Returns:
        str | None: the checkpoint path, or None when there is none (the training starts afresh).
    """
    named = ''
    if osp.isfile(osp.join(work_dir, 'last_checkpoint')):
        with open(osp.join(work_dir, 'last_checkpoint')) as f:
            named = f.read().strip()
    found = sorted({path for pattern in CHECKPOINT_PATTERNS for path in glob.glob(osp.join(work_dir, pattern))},
                   key=osp.getmtime, reverse=True)
    for path in ([named] if named else []) + found:
        try:
            check_checkpoint_file(path)
        except CheckpointReadError as err:
            print_log(f'Not resuming from {path}: {err}', logger='current', level=logging.WARNING)
            continue
        if named and path != named:
            print_log(f'{work_dir}/last_checkpoint names {named!r}, which is missing or incomplete; resuming '
                      f'from {path!r}, the newest complete checkpoint.', logger='current', level=logging.WARNING)
        return path
    return None


def set_resume(cfg, resume):
    """Apply ``--resume`` ('auto': from :func:`find_resume_checkpoint`; a path: from that file), then check
    the checkpoint the training will read (``--resume`` or the config's ``load_from``) before building.

    With 'auto' and no checkpoint yet, the training starts as it would without ``--resume``.

    Args:
        cfg (mmengine.Config): the config, changed in place.
        resume (str | None): None (no resume), 'auto' or a checkpoint path.
    """
    if resume == 'auto':
        resume = find_resume_checkpoint(cfg.work_dir)
        if resume is None:  # the first start of a job script that always passes --resume
            print_log(f'--resume: no complete checkpoint in {cfg.work_dir!r}; the training starts from the '
                      'beginning (from load_from, if the config has one).', logger='current')
            cfg.resume = False
    if resume is not None:
        cfg.resume, cfg.load_from = True, resume
    load_from = cfg.get('load_from')
    if load_from and '://' not in str(load_from):
        check_checkpoint_file(str(load_from))
    if load_from:
        drop_backbone_init_cfg(cfg, f'{"Resuming from" if cfg.get("resume") else "load_from"} {load_from}')


def _replace_sync_norms(node):
    """Turn every SyncBN norm config inside ``node`` into BN in place; returns how many."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') in SYNC_NORMS:
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += _replace_sync_norms(value)
    elif isinstance(node, list):
        count += sum(_replace_sync_norms(value) for value in node)
    return count


def init_cpu_distributed(cfg):
    """Start the process group of a distributed run on a machine without CUDA (``--launcher pytorch``).

    mmengine 0.10.7 calls ``torch.cuda.set_device`` before ``init_process_group`` and gives DDP the
    local rank as device id, both of which fail without CUDA. This starts the group itself (mmengine
    then skips its own), with ``env_cfg.dist_cfg``'s backend (gloo instead of nccl, which needs CUDA),
    lets DDP wrap the CPU model (``device_ids=None``), and turns SyncBN into BN (torch's SyncBatchNorm
    only synchronises CUDA tensors): each process then normalises its own part of the batch. Every
    change is logged. Does nothing with CUDA, without a launcher, or when the group exists.

    Args:
        cfg (mmengine.Config): the config, changed in place.
    """
    if cfg.get('launcher', 'none') == 'none' or torch.cuda.is_available() or torch_dist.is_initialized():
        return
    if cfg.launcher != 'pytorch':
        raise ValueError(f'--launcher {cfg.launcher} needs CUDA; on a machine without it, start the processes '
                         'with tools/dist_train.sh (torchrun, --launcher pytorch).')
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        print_log('No CUDA on this machine: the processes communicate with gloo instead of nccl.', logger='current')
        dist_cfg['backend'] = 'gloo'
    if dist_cfg.get('timeout') is not None:
        dist_cfg['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
    changed = _replace_sync_norms(cfg.model)
    if cfg.pop('sync_bn', None) is not None or changed:
        print_log(f'No CUDA on this machine: SyncBN cannot synchronise, so {changed} SyncBN layer config(s) and '
                  'cfg.sync_bn became plain BN; each process normalises its own images.',
                  logger='current', level=logging.WARNING)
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper.setdefault('device_ids', None)
    cfg.model_wrapper_cfg = wrapper
    torch_dist.init_process_group(**dist_cfg)


def build_runner(cfg):
    """Build mmengine's Runner, or the config's ``runner_type`` from the registry.

    Args:
        cfg (mmengine.Config): the full config.
    """
    init_cpu_distributed(cfg)
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def add_precision_args(parser):
    """Add ``--bf16`` and ``--int8 FILE``: how the test / demo / inference tools run the detector on a CPU.

    Args:
        parser (argparse.ArgumentParser): the tool's parser.
    """
    parser.add_argument('--bf16', action='store_true',
                        help='bf16 inference on the CPU (autocast; box decoding, NMS, RoIAlign and mask pasting in '
                             'fp32); same as --cfg-options test_cfg.fp16=True. Runs fp32, with a warning, on a CPU '
                             'without native bf16 (avx512_bf16 / AMX)')
    parser.add_argument('--int8', metavar='CALIBRATION',
                        help='int8 backbone, rebuilt from this calibration file of tools/quantize.py (with --bf16: '
                             'int8-mixed-bf16). Runs fp32, with a warning, on a CPU without VNNI / AMX-INT8')
    return parser

