"""Layer-wise lr decay on real mmdet detectors with a (narrow) VanillaNet backbone."""
from collections import Counter
from unittest import mock

import pytest
import torch.nn as nn
from mmengine.hub import get_config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

from mmdet.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS

import mmdet_vanillanet  # noqa: F401  (registration)
from mmdet_vanillanet.engine import VanillaNetLayerDecayOptimizerConstructor

BASE_LR, BASE_WD, RATE = 8e-5, 0.05, 0.6
# VanillaNet-13's strides with 8 channels everywhere: 11 blocks -> 6 layer ids, as the paper.
ARCH_13_NARROW = dict(dims=[8] * 12, strides=[1, 2, 2, 1, 1, 1, 1, 1, 1, 2, 1])


def build_retinanet(arch=None, out_indices=(0, 1, 2), **backbone_kwargs):
    """mmdet's RetinaNet R-50 config with a narrow VanillaNet backbone."""
    init_default_scope('mmdet')
    arch = arch or dict(dims=[16, 32, 64, 64], strides=[2, 2, 1])
    cfg = get_config('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py').model
    cfg.backbone = dict(type='VanillaNet', arch=arch, act_num=1, out_indices=out_indices,
                        **backbone_kwargs)
    cfg.neck.in_channels = [arch['dims'][i + 1] for i in out_indices]
    cfg.neck.start_level = 0
    return MODELS.build(cfg)


def build_groups(model, **paramwise_cfg):
    init_default_scope('mmdet')
    optim_wrapper = build_optim_wrapper(model, dict(
        optimizer=dict(type='AdamW', lr=BASE_LR, betas=(0.9, 0.999), weight_decay=BASE_WD),
        constructor='VanillaNetLayerDecayOptimizerConstructor',
        paramwise_cfg=paramwise_cfg or dict(decay_rate=RATE)))
    return optim_wrapper.optimizer.param_groups


def group_of(model, groups):
    """Parameter name -> its param group; checks each trainable param is in exactly one group."""
    counts = Counter(id(p) for g in groups for p in g['params'])
    by_id = {id(p): g for g in groups for p in g['params']}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert sorted(counts) == sorted(id(p) for p in trainable.values())
    assert set(counts.values()) == {1}
    return {name: by_id[id(p)] for name, p in trainable.items()}


def test_registered_where_mmdet_configs_look():
    assert OPTIM_WRAPPER_CONSTRUCTORS.get('VanillaNetLayerDecayOptimizerConstructor') is \
        VanillaNetLayerDecayOptimizerConstructor


def test_vanillanet13_layout_lr_and_weight_decay():
    model = build_retinanet(ARCH_13_NARROW, out_indices=(1, 8, 10))
    groups = group_of(model, build_groups(model))  # num_layers derived: 6
    expected_ids = {
        'backbone.stem1.0.weight': 0, 'backbone.stem1.1.bias': 0, 'backbone.stem2.2.weight': 0,
        'backbone.stem2.2.bn.weight': 0, 'backbone.stages.0.conv1.0.weight': 1,
        'backbone.stages.1.act.weight': 1, 'backbone.stages.2.conv2.1.weight': 2,
        'backbone.stages.9.conv2.0.bias': 5, 'backbone.stages.10.act.bn.bias': 6,
        'neck.lateral_convs.0.conv.weight': 7, 'bbox_head.retina_cls.bias': 7}
    for name, layer_id in expected_ids.items():
        assert groups[name]['layer_id'] == layer_id, name
        assert groups[name]['lr'] == pytest.approx(BASE_LR * RATE**(7 - layer_id), rel=1e-12)

    lr_by_id = {g['layer_id']: g['lr'] for g in groups.values()}
    assert sorted(lr_by_id) == list(range(8))
    for layer_id in range(7):
        assert lr_by_id[layer_id] / lr_by_id[layer_id + 1] == pytest.approx(RATE, rel=1e-12)
    assert lr_by_id[7] == BASE_LR
    for name, group in groups.items():
        param = model.get_parameter(name)
        no_decay = name.endswith('.bias') or param.ndim == 1
        assert group['weight_decay'] == (0. if no_decay else BASE_WD), name
    # the depthwise activation kernels are 4-D weights: decayed
    assert groups['backbone.stages.3.act.weight']['weight_decay'] == BASE_WD
    assert groups['backbone.stages.3.act.bn.weight']['weight_decay'] == 0.


def test_explicit_num_layers_matches_default_and_larger_shifts():
    model = build_retinanet(ARCH_13_NARROW, out_indices=(1, 8, 10))
    default = build_groups(model)
    explicit = build_groups(model, decay_rate=RATE, num_layers=6)
    assert [(g['group_name'], g['lr']) for g in default] == \
        [(g['group_name'], g['lr']) for g in explicit]
    larger = group_of(model, build_groups(model, decay_rate=RATE, num_layers=8))
    assert larger['backbone.stem1.0.weight']['lr'] == pytest.approx(BASE_LR * RATE**9)
    assert larger['neck.fpn_convs.0.conv.weight']['lr'] == BASE_LR


def test_narrow_arch_default_num_layers():
    model = build_retinanet()  # 3 blocks -> ids 1, 1, 2 -> num_layers 2
    groups = group_of(model, build_groups(model))
    assert groups['backbone.stages.1.conv1.0.weight']['lr'] == pytest.approx(BASE_LR * RATE**2)
    assert groups['backbone.stages.2.conv1.0.weight']['lr'] == pytest.approx(BASE_LR * RATE)
    assert groups['backbone.stem1.0.weight']['lr'] == pytest.approx(BASE_LR * RATE**3)


def test_deploy_structure():
    model = build_retinanet(ARCH_13_NARROW, out_indices=(1, 8, 10), deploy=True)
    groups = group_of(model, build_groups(model))
    for name in ('backbone.stem.0.weight', 'backbone.stem.1.weight', 'backbone.stem.1.bias'):
        assert groups[name]['layer_id'] == 0
    assert groups['backbone.stages.5.conv.weight']['layer_id'] == 3
    assert groups['backbone.stages.10.act.bias']['layer_id'] == 6
    assert groups['backbone.stages.10.conv.bias']['weight_decay'] == 0.
    assert groups['backbone.stages.10.conv.weight']['weight_decay'] == BASE_WD


def test_frozen_parameters_are_left_out():
    model = build_retinanet(frozen_stages=1)
    groups = group_of(model, build_groups(model))  # group_of checks exactly the trainable ones
    assert not any(name.startswith(('backbone.stem', 'backbone.stages.0.')) for name in groups)
    assert 'backbone.stages.1.conv1.0.weight' in groups


def test_groups_logged_once_as_a_table():
    model = build_retinanet()
    with mock.patch('mmdet_vanillanet.engine.layer_decay.print_log') as log:
        build_groups(model)
    log.assert_called_once()
    text = log.call_args.args[0]
    assert 'layer_0_decay' in text and 'outside the backbone' in text
    assert len(text.splitlines()) == 1 + 1 + 8  # title, header, 4 layer ids x (decay, no_decay)


def test_no_vanillanet_backbone():
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Conv2d(3, 8, 3)
            self.head = nn.Linear(8, 2)

    with pytest.raises(TypeError, match='VanillaNet'):
        build_groups(Detector())


def test_num_layers_too_small():
    model = build_retinanet()
    with pytest.raises(ValueError, match='num_layers >= 2'):
        build_groups(model, decay_rate=RATE, num_layers=1)


@pytest.mark.parametrize('paramwise_cfg, match', [
    (dict(num_layers=6), 'decay_rate'),
    (dict(decay_rate=0.), r'\(0, 1\]'),
    (dict(decay_rate=RATE, num_layers=0), 'positive int'),
    (dict(decay_rate=RATE, decay_type='stage_wise'), 'unsupported'),
])
def test_bad_paramwise_cfg(paramwise_cfg, match):
    with pytest.raises(ValueError, match=match):
        VanillaNetLayerDecayOptimizerConstructor(
            dict(optimizer=dict(type='AdamW', lr=BASE_LR)), paramwise_cfg)
