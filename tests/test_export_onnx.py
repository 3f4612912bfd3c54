"""ONNX export: the fused backbone and a single-stage detector, reproduced by ONNX Runtime (CPU)."""
import os.path as osp
import warnings

import onnx
import pytest
import torch
import torch.nn as nn
from tiny_detector import load_tool

from mmdet.registry import MODELS

from mmdet_vanillanet.export import (
    DetectorTensorOutputs,
    ONNXExportError,
    check_onnx,
    export_backbone,
    export_detector,
    export_onnx,
    onnx_session,
    run_onnx,
)
from mmdet_vanillanet.models import VanillaNet

NARROW = dict(dims=[8, 16, 24, 24, 32], strides=[2, 2, 1, 2])


def fused_net(**kwargs):
    torch.manual_seed(0)
    net = VanillaNet(arch=NARROW, act_num=2, out_indices=(0, 1, 3), **kwargs)
    net.init_weights()
    for module in net.modules():  # non-trivial BN statistics, so that fusing has something to fold
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    net.eval().switch_to_deploy()
    return net


def test_fused_backbone_dynamic_shapes_match_pytorch(tmp_path):
    net = fused_net()
    path = export_backbone(net, str(tmp_path / 'backbone.onnx'), shape=(1, 3, 96, 128))
    onnx.checker.check_model(path)
    session = onnx_session(path)
    assert [o.name for o in session.get_outputs()] == ['out0', 'out1', 'out3']
    # the export shape, another size and batch (dynamic axes), and both PyTorch paths (oneDNN and plain)
    for shape in [(1, 3, 96, 128), (2, 3, 70, 161)]:
        x = torch.randn(*shape)
        for fast in (True, False):
            net.fast_inference = fast
            result = check_onnx(session, net, x, tolerance=1e-4)
            assert result['max_rel'] < 1e-4 and result['num_tensors'] == 3


def test_training_structure_is_refused_with_the_fix(tmp_path):
    net = VanillaNet(arch=NARROW, act_num=2).eval()
    with pytest.raises(ONNXExportError, match='switch_to_deploy'):
        export_backbone(net, str(tmp_path / 'x.onnx'), shape=(1, 3, 64, 64))


def tiny_retinanet_cfg(**backbone):
    """A tiny RetinaNet (3 classes) on the narrow VanillaNet; ``backbone``: more backbone arguments."""
    return dict(
        type='RetinaNet',
        data_preprocessor=dict(type='DetDataPreprocessor', mean=[0, 0, 0], std=[1, 1, 1], pad_size_divisor=32),
        backbone=dict(type='VanillaNet', arch=NARROW, act_num=2, out_indices=(0, 1, 3), **backbone),
        neck=dict(type='FPN', in_channels=[16, 24, 32], out_channels=16, start_level=0, num_outs=3),
        bbox_head=dict(
            type='RetinaHead', num_classes=3, in_channels=16, feat_channels=16, stacked_convs=1,
            anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4, scales_per_octave=1,
                                  ratios=[1.0], strides=[8, 16, 32]),
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        test_cfg=dict(nms_pre=100, min_bbox_size=0, score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5),
                      max_per_img=10))


def tiny_retinanet():
    torch.manual_seed(0)
    model = MODELS.build(tiny_retinanet_cfg(deploy=True))
    model.init_weights()
    return model.eval()


def test_single_stage_detector_tensor_outputs_match_pytorch(tmp_path):
    model = tiny_retinanet()
    path, names = export_detector(model, str(tmp_path / 'retinanet.onnx'), shape=(1, 3, 64, 96))
    assert names == [f'cls_score{i}' for i in range(3)] + [f'bbox_pred{i}' for i in range(3)]
    session = onnx_session(path)
    x = torch.randn(1, 3, 64, 96)
    result = check_onnx(session, DetectorTensorOutputs(model), x)
    assert result['num_tensors'] == 6 and result['max_rel'] < 1e-4
    with torch.no_grad():
        cls_scores, _ = model._forward(x)
    assert [tuple(t.shape) for t in run_onnx(session, x)[:3]] == [tuple(t.shape) for t in cls_scores]


def test_two_stage_detectors_are_refused_with_a_reason():
    with pytest.raises(ONNXExportError, match='single-stage.*RoIAlign'):
        DetectorTensorOutputs(nn.Conv2d(3, 3, 1))


# The same RetinaNet, unfused: the tool fuses it.
TOOL_CONFIG = f"""
custom_imports = dict(imports=['mmdet_vanillanet'], allow_failed_imports=False)
default_scope = 'mmdet'
model = {tiny_retinanet_cfg()!r}
"""


@pytest.mark.parametrize('what', ['backbone', 'detector'])
def test_export_tool_fuses_exports_and_checks(tmp_path, capsys, what):
    config = tmp_path / 'tiny_retinanet.py'
    config.write_text(TOOL_CONFIG)
    out = tmp_path / f'{what}.onnx'
    load_tool('export_onnx').main([str(config), str(out), '--what', what, '--shape', '64', '80'])
    printed = capsys.readouterr().out
    assert osp.isfile(out) and 'random (no --checkpoint)' in printed
    relative = float(printed.split('check:')[1].split('input: ')[1].split(' relative')[0])
    assert relative < 1e-4
    model = onnx.load(str(out))
    names = [o.name for o in model.graph.output]
    assert names == (['out0', 'out1', 'out3'] if what == 'backbone'
                     else [f'cls_score{i}' for i in range(3)] + [f'bbox_pred{i}' for i in range(3)])
    # the fused structure was exported: no BatchNormalization, one Conv per 1x1 and per activation
    ops = [node.op_type for node in model.graph.node]
    assert 'BatchNormalization' not in ops
    convs = conv_kernels(model)
    num_blocks = 4  # the arch of TOOL_CONFIG; FPN adds a 1x1 lateral and a 3x3 conv per level, the head 3x3s
    assert convs['stem 4x4'] == 1 and convs['depthwise 5x5'] == num_blocks + 1
    assert convs['1x1'] == num_blocks + (3 if what == 'detector' else 0)
    assert set(convs) <= {'stem 4x4', 'depthwise 5x5', '1x1', '3x3'} and ('3x3' in convs) == (what == 'detector')


def conv_kernels(model):
    """How many Conv nodes of each kind an ONNX graph holds: 'stem 4x4', 'depthwise 5x5', '1x1', '3x3'."""
    kinds = {}
    for node in model.graph.node:
        if node.op_type == 'Conv':
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            size = 'x'.join(map(str, attrs['kernel_shape']))
            kind = {'4x4': 'stem 4x4', '5x5': 'depthwise 5x5'}.get(size, size)
            if kind == 'depthwise 5x5':
                assert attrs.get('group', 1) > 1, 'a 5x5 activation conv that is not depthwise'
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


@pytest.mark.parametrize('failure', ['non-finite', 'tolerance'])
def test_a_failed_check_leaves_no_onnx_file(tmp_path, failure):
    """Weights that make the backbone compute NaN, or a tolerance below float rounding: the check fails, says
    why, and the .onnx is deleted.

    (With NaN, PyTorch's oneDNN fast path returns zeros: its fused ReLU maps NaN to 0; the graph keeps the NaN.)
    """
    from mmengine.config import Config

    from mmdet_vanillanet.detectors import build_detector
    config = tmp_path / 'tiny_retinanet.py'
    config.write_text(TOOL_CONFIG)
    model = build_detector(Config.fromfile(str(config)).model, init_weights=True)
    if failure == 'non-finite':
        with torch.no_grad():
            model.backbone.stages[1].conv1[0].bias[0] = float('nan')
    torch.save(dict(state_dict=model.state_dict()), tmp_path / 'weights.pth')
    out = tmp_path / 'backbone.onnx'
    args, message = {'non-finite': ([], r'cannot be checked: .*ONNX Runtime: output 1 holds \d+ NaN'),
                     'tolerance': (['--tolerance', '1e-12'], r'deviates from PyTorch by .* more than 1e-12')}[failure]
    with pytest.raises(SystemExit, match=message):
        load_tool('export_onnx').main([str(config), str(out), '--checkpoint', str(tmp_path / 'weights.pth'),
                                       '--shape', '64', '80', *args])
    assert not out.exists()


class DataDependent(nn.Module):
    """A forward whose branch depends on the values: a trace records only the branch taken."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_export_shows_warnings_except_the_two_expected_ones(tmp_path):
    with pytest.warns(torch.jit.TracerWarning, match='Python boolean'):
        export_onnx(DataDependent(), str(tmp_path / 'branch.onnx'), torch.ones(1, 3, 8, 8), ['input'], ['out'])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        export_backbone(fused_net(), str(tmp_path / 'backbone.onnx'), shape=(1, 3, 64, 64))
    assert not [str(w.message) for w in caught]
