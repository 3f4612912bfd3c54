"""What the command-line tools share: mmdet-compatible flags, config loading, runner building.

The tools in ``tools/`` stay thin: they parse arguments and call these functions.
"""
import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner


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


def load_config(args):
    """Read ``args.config`` and apply ``--cfg-options``, ``--launcher`` and the work directory.

    Args:
        args (argparse.Namespace): parsed arguments of :func:`add_runner_args` plus ``config``.
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
    return cfg


def build_runner(cfg):
    """Build mmengine's Runner, or the config's ``runner_type`` from the registry.

    Args:
        cfg (mmengine.Config): the full config.
    """
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)
