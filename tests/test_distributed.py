"""Distributed training on CPU (gloo) through tools/dist_train.sh, and SyncBN configs on one device.

Equal results need the same gradients. A 2-process run with 2 images each matches a 1-process run with 4
images when (1) every process sees its half of each batch of 4 (mmengine's DefaultSampler shards the same
shuffled order), (2) nothing normalises over the batch (BN: the backbone's BN layers are in eval mode,
``norm_eval=True``; SyncBN would do, but torch's SyncBatchNorm only synchronises CUDA tensors) and (3) the
losses are averaged over all processes' samples: FCOS reduces its normalisers across processes, RetinaNet
(mmdet's AnchorHead) divides by each process's own positives, so its distributed gradient differs from
the single-process one on any hardware. Augmentation is deterministic here (no flip).
"""
import os.path as osp
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from tiny_detector import ROOT, load_tool, make_data, run_together, tool_env, write_config

import mmdet_vanillanet  # noqa: F401  (registration, safe loader)
from mmdet_vanillanet.checkpoint import load_checkpoint_file
from mmdet_vanillanet.tool_setup import build_runner, init_cpu_distributed

pytestmark = pytest.mark.usefixtures('one_thread')

SYNC_BN = dict(type='SyncBN', eps=1e-6)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def fcos_config(path, data, batch_size, **kwargs):
    return write_config(path, data, head='fcos', batch_size=batch_size, max_epochs=2, val_interval=10,
                        flip_prob=0.0, norm_cfg=SYNC_BN, norm_eval=True, custom_hooks=(), **kwargs)


def test_syncbn_config_trains_and_deploys_on_one_device(tmp_path):
    """mmengine's Runner turns SyncBN into BN when it does not run distributed; outside a Runner (deploy),
    torch's SyncBatchNorm in eval mode is a plain BN."""
    data = make_data(tmp_path / 'data')
    config = write_config(tmp_path / 'syncbn.py', data, max_epochs=1, val_interval=2, norm_cfg=SYNC_BN,
                          custom_hooks=())
    with open(config, 'a') as f:
        f.write("sync_bn = 'torch'\n")
    load_tool('train').main([config, '--work-dir', str(tmp_path / 'work')])
    assert (tmp_path / 'work' / 'epoch_1.pth').is_file()
    load_tool('deploy').main([config, str(tmp_path / 'work' / 'epoch_1.pth'), str(tmp_path / 'deploy')])
    assert (tmp_path / 'deploy' / 'syncbn_deploy.pth').is_file()


def test_cpu_process_group_setup(tmp_path, monkeypatch):
    """What init_cpu_distributed changes, in a process group of one (what torchrun sets up per process)."""
    if torch.cuda.is_available():
        pytest.skip('the CPU setup is for machines without CUDA')
    data = make_data(tmp_path / 'data')
    cfg = Config.fromfile(fcos_config(tmp_path / 'fcos.py', data, batch_size=2))
    cfg.launcher, cfg.work_dir, cfg.sync_bn = 'pytorch', str(tmp_path / 'work'), 'torch'
    cfg.env_cfg.dist_cfg.backend = 'nccl'  # mmdet's default, which needs CUDA
    cfg.train_cfg.max_epochs = 1
    for key, value in dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()), RANK='0', WORLD_SIZE='1',
                           LOCAL_RANK='0').items():
        monkeypatch.setenv(key, value)
    try:
        runner = build_runner(cfg)
        assert torch_dist.get_backend() == 'gloo' and runner.distributed
        assert cfg.model.backbone.norm_cfg.type == 'BN' and 'sync_bn' not in cfg
        assert cfg.model_wrapper_cfg.device_ids is None
        runner.train()
        assert type(runner.model).__name__ == 'MMDistributedDataParallel'
        init_cpu_distributed(cfg)  # the group exists: nothing happens
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    assert (tmp_path / 'work' / 'epoch_1.pth').is_file()


def assert_equal_to_one_process(data, tmp_path, distributed_dir):
    """Train the same FCOS in one process with the whole batch (4); its epoch-2 weights must equal those in
    ``distributed_dir`` (within float rounding), and differ clearly from its epoch-1 weights."""
    one = fcos_config(tmp_path / 'one.py', data, batch_size=4)
    load_tool('train').main([one, '--work-dir', str(tmp_path / 'one')])
    start = load_checkpoint_file(tmp_path / 'one' / 'epoch_1.pth')['state_dict']
    single = load_checkpoint_file(tmp_path / 'one' / 'epoch_2.pth')['state_dict']
    distributed = load_checkpoint_file(distributed_dir / 'epoch_2.pth')['state_dict']
    assert single.keys() == distributed.keys()
    deviation = max(float((single[k].double() - distributed[k].double()).abs().max()) for k in single)
    moved = max(float((single[k].double() - start[k].double()).abs().max()) for k in single)
    assert deviation < 1e-6 < 1e-3 < moved, (deviation, moved)


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_total_batch(tmp_path):
    data = make_data(tmp_path / 'data')
    two = fcos_config(tmp_path / 'two.py', data, batch_size=2)
    env = tool_env(PYTHON=sys.executable, PORT=str(free_port()))
    result = subprocess.run(['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), two, '2', '--work-dir',
                             str(tmp_path / 'two')], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert 'GPU number: 2' in log and 'SyncBN cannot synchronise' in log
    assert_equal_to_one_process(data, tmp_path, tmp_path / 'two')


@pytest.mark.slow  # about 15 s of two training processes, beside the one above
def test_two_nodes_of_one_process_equal_one_process(tmp_path):
    """Multi-node through tools/dist_train.sh: NNODES, NODE_RANK, MASTER_ADDR and PORT, as mmdet's script takes
    them; two "nodes" of one process each on 127.0.0.1, each with its own work dir (as on two machines)."""
    data = make_data(tmp_path / 'data')
    two = fcos_config(tmp_path / 'two.py', data, batch_size=2)
    port = str(free_port())
    logs = run_together([['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), two, '1', '--work-dir',
                          str(tmp_path / f'node{rank}')] for rank in (0, 1)], timeout=600, cwd=ROOT,
                        envs=[tool_env(PYTHON=sys.executable, NNODES='2', NODE_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                                       PORT=port) for rank in (0, 1)])
    assert 'GPU number: 2' in logs[0]
    assert not list((tmp_path / 'node1').glob('epoch_*.pth'))  # rank 0 (node 0) writes the checkpoints
    assert_equal_to_one_process(data, tmp_path, tmp_path / 'node0')


@pytest.mark.parametrize('script, args', [('dist_train.sh', ['1']), ('dist_test.sh', ['missing.pth', '1'])])
def test_launch_scripts_use_the_project_environment(script, args, tmp_path):
    """Without PYTHON, the scripts run the project's .venv, not whatever `python` is first on PATH."""
    env = tool_env(PORT=str(free_port()), PATH='/usr/bin:/bin')
    env.pop('PYTHON', None)
    missing = tmp_path / 'no_such_config.py'
    result = subprocess.run(['bash', osp.join(ROOT, 'tools', script), str(missing), *args], env=env,
                            capture_output=True, text=True, timeout=120)
    # the error of tools/train.py / test.py itself: torch, mmdet and the plugin were importable
    assert f"Config file '{missing}' does not exist" in result.stderr, result.stderr[-2000:]
