"""--bf16 / --int8 through the tools: tools/test.py (and test_cfg.fp16=True), tools/quantize.py, the fallbacks.

A tiny RetinaNet (tests/tiny_detector.py) with random weights and score_thr 0, evaluated in process by the
tools' own ``main``; a spy on the backbone's oneDNN path records the dtype each forward ran in.
"""
import pickle

import pytest
import torch
from tiny_detector import load_tool, make_data, write_config

from mmdet_vanillanet import cpu_support
from mmdet_vanillanet.detectors import build_detector
from mmdet_vanillanet.models import onednn_inference
from mmdet_vanillanet.precision import Int8VanillaNet, load_calibration


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A tiny RetinaNet config on synthetic data and a checkpoint of its (random, fixed) weights."""
    from mmengine.config import Config
    folder = tmp_path_factory.mktemp('precision_tools')
    config = write_config(folder / 'tiny.py', make_data(folder / 'data'))
    torch.manual_seed(0)
    model = build_detector(Config.fromfile(config).model, init_weights=True)
    checkpoint = str(folder / 'tiny.pth')
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), checkpoint)
    return config, checkpoint, folder


@pytest.fixture
def backbone_dtypes(monkeypatch):
    """The dtype of every oneDNN forward of a VanillaNet (the training structure is fused on the fly by int8 only);
    ``.channels_last`` has whether each returned channels-last maps."""
    seen = ForwardCalls()
    fused_forward = onednn_inference.fused_forward

    def spy(net, x, dtype, channels_last_outputs=False):
        seen.append(dtype)
        seen.channels_last.append(channels_last_outputs)
        return fused_forward(net, x, dtype, channels_last_outputs)

    monkeypatch.setattr(onednn_inference, 'fused_forward', spy)
    return seen


class ForwardCalls(list):
    def __init__(self):
        super().__init__()
        self.channels_last = []

    def clear(self):
        super().clear()
        self.channels_last.clear()


@pytest.fixture(autouse=True)
def fresh_warnings():
    cpu_support.warn_once.cache_clear()
    yield
    cpu_support.warn_once.cache_clear()


def run_test_tool(tiny, tmp_path, *flags):
    config, checkpoint, _ = tiny
    out = tmp_path / 'predictions.pkl'
    load_tool('test').main([config, checkpoint, '--work-dir', str(tmp_path), '--out', str(out), *flags])
    with open(out, 'rb') as f:  # written by this test's own run
        return pickle.load(f)


def deploy_config(tiny, tmp_path):
    """The tiny config in its fused form (so that the backbone takes the oneDNN paths)."""
    config, _, _ = tiny
    path = tmp_path / 'tiny_deploy.py'
    path.write_text(f"_base_ = {config!r}\nmodel = dict(backbone=dict(deploy=True))\n")
    return str(path)


def best_detections(predictions):
    return [(p['pred_instances']['scores'][0], p['pred_instances']['bboxes'][0]) for p in predictions]


@pytest.fixture(scope='module')
def fused_checkpoint(tiny):
    from mmengine.config import Config

    from mmdet_vanillanet.detectors import fuse_vanillanets
    config, checkpoint, folder = tiny
    model = build_detector(Config.fromfile(config).model)
    model.load_state_dict(torch.load(checkpoint)['state_dict'])
    fuse_vanillanets(model)
    path = str(folder / 'tiny_fused.pth')
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), path)
    return path


@pytest.mark.parametrize('flags', [['--bf16'], ['--cfg-options', 'test_cfg.fp16=True']])
def test_bf16_reaches_the_backbone_and_the_detector_runs_whole(tiny, fused_checkpoint, tmp_path, backbone_dtypes,
                                                              flags):
    config, _, folder = tiny
    fused = (deploy_config(tiny, tmp_path), fused_checkpoint, folder)
    reference = run_test_tool(fused, tmp_path / 'fp32')
    assert set(backbone_dtypes) == {torch.float32}
    backbone_dtypes.clear()
    predictions = run_test_tool(fused, tmp_path / 'bf16', *flags)
    assert set(backbone_dtypes) == {torch.bfloat16}
    assert set(backbone_dtypes.channels_last) == {True}  # Fp32PostprocessHook runs the detector channels-last
    assert len(predictions) == len(reference) == 4
    for (score, box), (ref_score, ref_box) in zip(best_detections(predictions), best_detections(reference)):
        assert box.dtype == torch.float32
        torch.testing.assert_close(score, ref_score, rtol=0.05, atol=0.01)
        torch.testing.assert_close(box, ref_box, rtol=0, atol=1.0)


def test_bf16_without_native_support_runs_fp32_and_says_so(tiny, fused_checkpoint, tmp_path, backbone_dtypes,
                                                           monkeypatch):
    monkeypatch.setenv(cpu_support.NO_NATIVE_ENV, 'bf16')
    _, _, folder = tiny
    with pytest.warns(UserWarning, match='--bf16: no native bf16 on this CPU.*running fp32'):
        run_test_tool((deploy_config(tiny, tmp_path), fused_checkpoint, folder), tmp_path, '--bf16')
    assert set(backbone_dtypes) == {torch.float32}


def test_quantize_then_test_int8(tiny, tmp_path, monkeypatch):
    config, checkpoint, _ = tiny
    calibration = tmp_path / 'int8.pth'
    load_tool('quantize').main([config, checkpoint, '--out', str(calibration), '--num-images', '3'])
    data = load_calibration(calibration)
    assert data['meta']['num_images'] == 3 and len(set(data['meta']['image_ids'])) == 3
    assert set(data['backbones']) == {'backbone'}
    replaced = []
    original = Int8VanillaNet.forward
    monkeypatch.setattr(Int8VanillaNet, 'forward', lambda self, x: replaced.append(1) or original(self, x))
    reference = run_test_tool(tiny, tmp_path / 'fp32')
    assert not replaced
    predictions = run_test_tool(tiny, tmp_path / 'int8', '--int8', str(calibration))
    assert len(replaced) == 2  # two batches of two images through the int8 backbone
    assert len(predictions) == len(reference)
    # random weights, int8 activations: the detections move, but the best one of each image stays near
    for (score, box), (ref_score, ref_box) in zip(best_detections(predictions), best_detections(reference)):
        assert abs(float(score) - float(ref_score)) < 0.05


def test_int8_without_native_support_runs_fp32_and_says_so(tiny, tmp_path, monkeypatch):
    config, checkpoint, _ = tiny
    calibration = tmp_path / 'int8.pth'
    load_tool('quantize').main([config, checkpoint, '--out', str(calibration), '--num-images', '2'])
    monkeypatch.setenv(cpu_support.NO_NATIVE_ENV, 'int8')
    monkeypatch.setattr(Int8VanillaNet, 'forward', lambda self, x: pytest.fail('the int8 backbone ran'))
    with pytest.warns(UserWarning, match='--int8: no native int8 on this CPU'):
        run_test_tool(tiny, tmp_path, '--int8', str(calibration))


def test_a_file_that_is_no_calibration_is_refused(tiny, tmp_path):
    config, checkpoint, _ = tiny
    with pytest.raises(ValueError, match='not an int8 calibration file'):
        run_test_tool(tiny, tmp_path, '--int8', checkpoint)
