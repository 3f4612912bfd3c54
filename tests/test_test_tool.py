"""tools/test.py loads the checkpoint strictly inside mmengine's own flow (after every hook's ``before_run``).

A config carrying mmengine's ``EMAHook`` (RTMDet, YOLOX and many zoo configs do) is evaluated through
tools/test.py, mmdet's own tools/test.py and mmdet's ``DetInferencer``; a checkpoint whose neck or head
keys or shapes differ from the model's is refused with the keys named, with and without the hook.
"""
import glob
import os.path as osp
import re
import subprocess
import sys

import mmengine
import pytest
import torch
from mmengine.config import Config
from tiny_detector import load_tool, make_data, tool_env, write_config

import mmdet
from mmdet.apis import DetInferencer

import mmdet_vanillanet  # noqa: F401  (registration, safe loader)
from mmdet_vanillanet.checkpoint import VanillaNetWeightsError, load_checkpoint_file

pytestmark = pytest.mark.usefixtures('one_thread')

EMA_HOOK = dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.0002, update_buffers=True, priority=49)
MMDET_TEST = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'test.py')


@pytest.fixture(scope='module')
def ema(tmp_path_factory):
    """A tiny RetinaNet trained one epoch with an EMAHook: (folder, config, checkpoint, data root)."""
    root = tmp_path_factory.mktemp('ema')
    data = make_data(root / 'data')
    config = write_config(root / 'ema.py', data, max_epochs=1, val_interval=2, custom_hooks=(EMA_HOOK,))
    load_tool('train').main([config, '--work-dir', str(root / 'work')])
    checkpoint = str(root / 'work' / 'epoch_1.pth')
    assert 'ema_state_dict' in load_checkpoint_file(checkpoint)
    return root, config, checkpoint, data


def test_our_test_tool_evaluates_an_ema_config(ema, tmp_path):
    root, config, checkpoint, _ = ema
    load_tool('test').main([config, checkpoint, '--work-dir', str(tmp_path / 'work'), '--out',
                            str(tmp_path / 'preds.pkl')])
    assert len(mmengine.load(tmp_path / 'preds.pkl')) == 4


def test_mmdet_own_test_tool_evaluates_an_ema_config(ema, tmp_path):
    root, config, checkpoint, _ = ema
    result = subprocess.run([sys.executable, MMDET_TEST, config, checkpoint, '--work-dir', str(tmp_path)],
                            env=tool_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r'coco/bbox_mAP: -?\d\.\d+', result.stdout + result.stderr)


def test_det_inferencer_runs_an_ema_config(ema, tmp_path):
    root, config, checkpoint, data = ema
    cfg = Config.fromfile(config)
    cfg.visualizer = dict(type='DetLocalVisualizer')  # what mmdet's configs carry and the tiny one lacks
    inferencer = DetInferencer(model=cfg, weights=checkpoint, device='cpu')
    image = sorted(glob.glob(osp.join(data, 'val', '*.png')))[0]
    result = inferencer(image, out_dir=str(tmp_path / 'out'), no_save_pred=True)
    assert len(result['predictions'][0]['bboxes']) > 0
    assert glob.glob(str(tmp_path / 'out' / 'vis' / '*.png'))


def altered_checkpoint(checkpoint, path, drop=(), reshape=()):
    """``checkpoint`` with some keys removed and some tensors given another shape."""
    saved = load_checkpoint_file(checkpoint)
    state_dict = saved['state_dict']
    for key in drop:
        del state_dict[key]
    for key in reshape:
        state_dict[key] = torch.zeros(3, *state_dict[key].shape[1:])
    torch.save(saved, path)
    return str(path)


@pytest.mark.parametrize('hooks', ['EMAHook', 'none'])
@pytest.mark.parametrize('change, phrases', [
    (dict(drop=['neck.lateral_convs.0.conv.weight']), ['1 missing keys: neck.lateral_convs.0.conv.weight']),
    (dict(reshape=['bbox_head.retina_cls.weight']),
     ['1 shape mismatches (checkpoint vs model): bbox_head.retina_cls.weight (3, 16, 3, 3) vs (5, 16, 3, 3)']),
])
def test_our_test_tool_refuses_a_neck_or_head_that_does_not_fit(ema, tmp_path, hooks, change, phrases):
    """mmengine's load_from would skip these keys with a warning and evaluate random weights there."""
    root, config, checkpoint, _ = ema
    other = altered_checkpoint(checkpoint, tmp_path / 'other.pth', **change)
    with pytest.raises(VanillaNetWeightsError) as error:
        load_tool('test').main([config, other, '--work-dir', str(tmp_path / 'work'),
                                *(['--cfg-options', 'custom_hooks=[]'] if hooks == 'none' else [])])
    message = str(error.value)
    assert message.startswith(f'{other} does not fit the detector of the config')
    for phrase in phrases:
        assert phrase in message, message
