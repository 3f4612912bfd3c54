"""The detectors the VanillaNet authors released (mmdet 2.x), through this project's recipe configs and mmdet's tools.

Stand-ins (``released_detectors.py``) hold exactly the keys, shapes and ``meta`` fields of the released
files, with random values. Everything here runs in a folder with COCO's layout (synthetic images under
COCO's class names) and without the ImageNet weights that the recipe configs' ``init_cfg`` names: a trained
detector replaces every weight, so testing, inference, FLOPs and deploying must not need that file.
"""
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint
from released_detectors import RELEASED, coco_layout, count_parameters, write_released_checkpoint
from tiny_detector import tool_env

import mmdet
from mmdet.registry import MODELS

import mmdet_vanillanet  # noqa: F401  (registration, safe loader)
from mmdet_vanillanet.datasets import generate_synthetic_coco
from mmdet_vanillanet.deploy import deploy_detector

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MMDET_TOOLS = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools')
IMAGENET_FILE = 'checkpoints/vanillanet_13_act_num_4_kd_pretrain.pth'


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """A working directory with ``data/coco`` (2 train images, 1 val image) and no ``checkpoints/`` folder."""
    root = tmp_path_factory.mktemp('released')
    synthetic = generate_synthetic_coco(str(root / 'synthetic'), num_train=2, num_val=1, image_size=96, seed=3,
                                        show_progress=False)['root']
    coco_layout(synthetic, str(root / 'data' / 'coco'))
    assert not (root / IMAGENET_FILE).exists()
    return root


_written = {}


@pytest.fixture(params=sorted(RELEASED))
def released(request, workspace):
    """(name, path of the stand-in checkpoint); each file is written once per session."""
    name = request.param
    if name not in _written:
        _written[name] = write_released_checkpoint(name, workspace / RELEASED[name]['checkpoint'])
    return name, _written[name]


def run(command, cwd, timeout=600):
    # as many threads as this process computes on: 2 on 2 cores, 1 in a worker of `make test` (pytest-xdist)
    result = subprocess.run([sys.executable, *map(str, command)], cwd=cwd,
                            env=dict(tool_env(), OMP_NUM_THREADS=str(torch.get_num_threads())),
                            capture_output=True, text=True, timeout=timeout)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def recipe(name):
    return osp.join(ROOT, RELEASED[name]['config'])


# Random weights score every class of Mask R-CNN's softmax about 1/81, under its 0.05 threshold; keep them all
# so that the metric has detections to evaluate.
KEEP_ALL = {'retinanet': [], 'mask-rcnn': ['--cfg-options', 'model.test_cfg.rcnn.score_thr=0.0']}


def test_stand_ins_have_the_reference_parameter_counts():
    """The training structure of the released detectors: about 123M (RetinaNet) and 125M parameters."""
    assert count_parameters(RELEASED['retinanet']['shapes']()) / 1e6 == pytest.approx(123.49, abs=0.01)
    assert count_parameters(RELEASED['mask-rcnn']['shapes']()) / 1e6 == pytest.approx(125.26, abs=0.01)


def test_recipe_builds_without_the_imagenet_file_and_loads_every_key_strictly(released, workspace, monkeypatch):
    name, path = released
    monkeypatch.chdir(workspace)
    cfg = Config.fromfile(recipe(name))
    assert cfg.model.backbone.init_cfg.checkpoint == IMAGENET_FILE and not osp.exists(IMAGENET_FILE)
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)  # no init_weights: that is training's business
    shapes = RELEASED[name]['shapes']()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == dict(shapes)
    checkpoint = load_checkpoint(model, path, map_location='cpu', strict=True)
    assert checkpoint['meta']['CLASSES'][0] == 'person'
    for key, value in checkpoint['state_dict'].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_our_test_tool_evaluates_them(released, workspace):
    name, path = released
    log = run([osp.join(ROOT, 'tools', 'test.py'), recipe(name), path, '--work-dir', workspace / 'ours' / name,
               *KEEP_ALL[name]], cwd=workspace)
    for metric in RELEASED[name]['metrics']:
        assert re.search(rf'coco/{metric}_mAP: -?\d\.\d+', log), log[-3000:]
    assert 'The checkpoint' in log and 'the backbone init_cfg (pretrained ImageNet weights) is not read' in log


@pytest.mark.slow
def test_mmdet_own_test_tool_evaluates_them(released, workspace):
    name, path = released
    log = run([osp.join(MMDET_TOOLS, 'test.py'), recipe(name), path, '--work-dir', workspace / 'mmdet' / name,
               *KEEP_ALL[name]], cwd=workspace)
    for metric in RELEASED[name]['metrics']:
        assert re.search(rf'coco/{metric}_mAP: -?\d\.\d+', log), log[-3000:]
    assert 'missing keys' not in log and 'unexpected key' not in log


def test_deploy_fuses_them_with_equal_outputs(released, workspace, monkeypatch):
    name, path = released
    monkeypatch.chdir(workspace)
    result = deploy_detector(recipe(name), path, str(workspace / 'deploy' / name), shape=(256, 256), num_images=1)
    assert result['max_rel'] < 1e-4
    params = {'retinanet': 75.38, 'mask-rcnn': 77.15}[name]
    assert result['params_after'] / 1e6 == pytest.approx(params, abs=0.01)
    fused = torch.load(result['checkpoint'], weights_only=True)
    assert fused['meta']['dataset_meta']['classes'][0] == 'person'
    assert not any('stem1' in key for key in fused['state_dict'])


def readme_python_block(heading):
    text = open(osp.join(ROOT, 'README.md')).read().split(heading, 1)[1]
    return re.search(r'```python\n(.*?)```', text, flags=re.S).group(1)


def test_readme_det_inferencer_example_runs(workspace):
    """README's DetInferencer lines, as written, in a fresh process (the config's custom_imports loads the plugin)."""
    name = 'retinanet'
    path = _written.get(name) or write_released_checkpoint(name, workspace / RELEASED[name]['checkpoint'])
    _written[name] = path
    os.makedirs(workspace / 'checkpoints', exist_ok=True)
    target = workspace / 'checkpoints' / RELEASED[name]['checkpoint']
    if not target.exists():
        os.link(path, target)
    if not (workspace / 'configs').exists():
        os.symlink(osp.join(ROOT, 'configs'), workspace / 'configs')
    image = sorted((workspace / 'data' / 'coco' / 'val2017').iterdir())[0]
    (workspace / 'demo.jpg').write_bytes(image.read_bytes())
    code = (readme_python_block('In Python, with mmdet\'s inferencer')
            + readme_python_block('The same inferencer in bf16'))
    log = run(['-c', code], cwd=workspace)
    detections = re.search(r"(\d+) detections; classes \('person', 'bicycle'\)", log)
    assert detections and int(detections.group(1)) > 0, log[-2000:]
    assert re.search(r'^\d+ detections in bf16$', log, flags=re.M), log[-2000:]
    assert list((workspace / 'outputs' / 'vis').iterdir())
    assert not (workspace / IMAGENET_FILE).exists()


@pytest.mark.slow
def test_mmdet_get_flops_counts_them_without_the_imagenet_file(workspace):
    log = run([osp.join(MMDET_TOOLS, 'analysis_tools', 'get_flops.py'), recipe('retinanet'), '--num-images', '1'],
              cwd=workspace)
    # the training structure at 800 x 800 (mmengine's format: 0.382T)
    assert re.search(r'Flops: \d+(\.\d+)?[GT]\n', log) and re.search(r'Params: 0\.123G', log), log[-2000:]


@pytest.mark.slow
def test_load_from_fine_tunes_them_without_the_imagenet_file(released, workspace):
    name, path = released
    work_dir = workspace / 'finetune' / name
    log = run([osp.join(ROOT, 'tools', 'train.py'), recipe(name), '--work-dir', work_dir, '--cfg-options',
               f'load_from={path}', 'train_dataloader.batch_size=1', 'train_dataloader.num_workers=0',
               'train_dataloader.persistent_workers=False', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=2',
               'train_dataloader.dataset.pipeline.2.scales=[(1333,480)]', 'default_hooks.checkpoint.save_last=False',
               'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1'], cwd=workspace)
    assert f'Load checkpoint from {path}' in log
    assert 'missing keys' not in log and 'unexpected key' not in log
    assert re.search(r'Epoch\(train\) \[1\]\[2/2\].* loss: \d+\.\d+', log), log[-3000:]
