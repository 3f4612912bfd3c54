"""The backbone's memory layout never reaches mmdet: whatever VanillaNet runs in inside, the detector
computes the same function.

mmcv 2.1.0's RoIAlign reads its input's memory as NCHW without checking the layout, and its deformable
convs refuse anything but NCHW-contiguous input. The first group of tests pins that behaviour of the
layout-sensitive mmcv ops that mmdet's detectors apply to backbone and neck features (why the
backbone's contract exists); the second builds detectors of mmdet's config zoo with a narrow VanillaNet
and checks that (a) every such op receives NCHW-contiguous input and (b) the outputs with the default
backbone (channels-last inside) equal those with ``channels_last=False``, with the same weights,
compared after the RPN where its top-k choices cannot hide a difference.
"""
import copy

import pytest
import torch
from mmcv import ops as mmcv_ops
from mmengine.hub import get_config
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData
from test_configs import narrow_heads

from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs

import mmdet_vanillanet  # noqa: F401  (registration)
from mmdet_vanillanet.output_comparison import detector_outputs, relative_deviation

pytestmark = pytest.mark.usefixtures('one_thread')

# mmcv ops that read backbone or neck feature maps, and what each does with channels-last input.
LAYOUT_SENSITIVE_OPS = (mmcv_ops.RoIAlign, mmcv_ops.RoIPool, mmcv_ops.DeformConv2d, mmcv_ops.ModulatedDeformConv2d,
                        mmcv_ops.CARAFE, mmcv_ops.CARAFENaive, mmcv_ops.CARAFEPack, mmcv_ops.MaskedConv2d,
                        mmcv_ops.DeformRoIPool, mmcv_ops.MultiScaleDeformableAttention)


# ---- what mmcv's ops do with a channels-last feature map ---------------------------------------

def _features(channels=8, size=(12, 16), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, *size, generator=generator)


ROIS = torch.tensor([[0, 0.0, 0.0, 60.0, 40.0], [1, 8.0, 4.0, 50.0, 90.0], [0, 20.0, 30.0, 90.0, 70.0]])


def _roi_align(x):
    return mmcv_ops.RoIAlign((7, 7), spatial_scale=1 / 8, sampling_ratio=2, aligned=True)(x, ROIS)


def _deform_conv(x):
    torch.manual_seed(0)
    conv = mmcv_ops.DeformConv2dPack(x.shape[1], 4, 3, padding=1)
    torch.nn.init.normal_(conv.conv_offset.weight, std=0.1)
    return conv(x)


def _modulated_deform_conv(x):
    torch.manual_seed(0)
    conv = mmcv_ops.ModulatedDeformConv2dPack(x.shape[1], 4, 3, padding=1)
    torch.nn.init.normal_(conv.conv_offset.weight, std=0.1)
    return conv(x)


def _multi_scale_deformable_attention(x):
    torch.manual_seed(0)
    attention = mmcv_ops.MultiScaleDeformableAttention(embed_dims=x.shape[1], num_heads=2, num_levels=1,
                                                       num_points=2, batch_first=True)
    height, width = x.shape[-2:]
    value = x.flatten(2).transpose(1, 2)
    reference_points = torch.rand(x.shape[0], height * width, 1, 2, generator=torch.Generator().manual_seed(0))
    return attention(value, value=value, reference_points=reference_points,
                     spatial_shapes=torch.tensor([[height, width]]), level_start_index=torch.tensor([0]))


# What mmcv 2.1.0 does on the CPU with a channels-last feature map. RoIPool, CARAFE, MaskedConv2d and
# DeformRoIPool have no CPU kernels in mmcv 2.1.0 (not checkable here); their CUDA kernels index the
# input's memory as NCHW as well.
AUDIT = {
    'RoIAlign': (_roi_align, 'wrong values'),  # Faster / Mask / Cascade R-CNN ...
    'ModulatedDeformConv2d': (_modulated_deform_conv, 'wrong values'),  # DyHead, DCNv2 heads
    'DeformConv2d': (_deform_conv, 'raises'),  # VFNet, RepPoints, guided anchoring
    'MultiScaleDeformableAttention': (_multi_scale_deformable_attention, 'same'),  # Deformable DETR, DINO
}


def layout_behaviour(function):
    """What ``function`` does with a channels-last copy of a feature map, against the NCHW one."""
    x = _features()
    expected = function(x)
    try:
        got = function(x.contiguous(memory_format=torch.channels_last))
    except (RuntimeError, AssertionError, ValueError):
        return 'raises'
    return 'same' if torch.allclose(got, expected, rtol=1e-5, atol=1e-6) else 'wrong values'


@pytest.mark.parametrize('op', AUDIT)
def test_mmcv_op_behaviour_on_channels_last_input(op):
    """Why the backbone hands NCHW-contiguous maps to mmdet: these ops cannot take channels-last ones."""
    function, behaviour = AUDIT[op]
    assert layout_behaviour(function) == behaviour


# ---- detectors of mmdet's zoo with a narrow VanillaNet -----------------------------------------

# A narrow VanillaNet with outputs at strides 4/8/16/32 (16/24/32/48 channels).
NARROW_BACKBONE = dict(type='VanillaNet', arch=dict(dims=[16, 16, 24, 32, 48], strides=[1, 2, 2, 2]), act_num=2,
                       out_indices=(0, 1, 2, 3))
OUT_CHANNELS = [16, 24, 32, 48]

ZOO = {
    # name: (mmdet config, backbone outputs the neck takes (ResNet's out_indices), RoI head at fixed proposals?)
    'faster-rcnn': ('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', (0, 1, 2, 3), 'roi'),
    'mask-rcnn': ('mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', (0, 1, 2, 3), 'roi'),
    'cascade-mask-rcnn': ('mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py', (0, 1, 2, 3), 'roi'),
    'vfnet': ('mmdet::vfnet/vfnet_r50_fpn_1x_coco.py', (0, 1, 2, 3), 'dense'),
    'reppoints': ('mmdet::reppoints/reppoints-moment_r50_fpn-gn_head-gn_1x_coco.py', (0, 1, 2, 3), 'dense'),
    'atss-dyhead': ('mmdet::dyhead/atss_r50_fpn_dyhead_1x_coco.py', (0, 1, 2, 3), 'dense'),
    'deformable-detr': ('mmdet::deformable_detr/deformable-detr_r50_16xb2-50e_coco.py', (1, 2, 3), 'dense'),
}


def zoo_model_cfg(config, out_indices, channels_last):
    cfg = get_config(config)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone = dict(NARROW_BACKBONE, out_indices=out_indices, channels_last=channels_last)
    if 'encoder' in model_cfg:
        model_cfg.num_queries = 30
    else:
        narrow_heads({k: v for k, v in model_cfg.items() if k != 'backbone'})
    first_neck = model_cfg.neck[0] if isinstance(model_cfg.neck, list) else model_cfg.neck
    first_neck.in_channels = [OUT_CHANNELS[i] for i in out_indices]
    return model_cfg


def build_pair(config, out_indices):
    """The same detector (same weights) with the default backbone and with ``channels_last=False``."""
    init_default_scope('mmdet')
    torch.manual_seed(0)
    default = MODELS.build(zoo_model_cfg(config, out_indices, channels_last=True))
    default.init_weights()
    _randomise_norm_statistics(default)
    nchw = MODELS.build(zoo_model_cfg(config, out_indices, channels_last=False))
    nchw.load_state_dict(default.state_dict())
    return default.eval(), nchw.eval()


def _randomise_norm_statistics(model):
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))


def record_op_inputs(model):
    """Register hooks that record, for every layout-sensitive mmcv op in ``model``, its input's layout."""
    seen = []

    def hook(module, args, kwargs):
        features = args[0] if args else next(iter(kwargs.values()))
        # The feature map comes first (offsets and masks that mmdet slices out of one tensor are its own
        # business); attention takes flattened (N, HW, C) sequences, which carry no image layout.
        seen.append((type(module).__name__, features.dim() != 4 or features.is_contiguous()))

    for module in model.modules():
        if isinstance(module, LAYOUT_SENSITIVE_OPS):
            module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def batch(size=(96, 128), num_images=2):
    data = demo_mm_inputs(batch_size=num_images, image_shapes=(3, *size), num_items=[3] * num_images,
                          num_classes=2)
    inputs = torch.stack([d.float() for d in data['inputs']]) / 255 * 4 - 2
    samples = data['data_samples']
    for sample in samples:
        sample.set_metainfo(dict(batch_input_shape=size, pad_shape=size, img_shape=size))
    return inputs, samples


def fixed_proposals(samples, num=12, seed=0):
    """The same proposals for every model: the RPN's top-k cannot hide a difference in the RoI head."""
    generator = torch.Generator().manual_seed(seed)
    proposals = []
    for sample in samples:
        height, width = sample.metainfo['img_shape']
        corner = torch.rand(num, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
        extent = 8 + torch.rand(num, 2, generator=generator) * torch.tensor([width * 0.4, height * 0.4])
        proposals.append(InstanceData(bboxes=torch.cat([corner, corner + extent], dim=1)))
    return proposals


@pytest.mark.parametrize('name', ZOO)
def test_backbone_layout_leaves_the_detector_unchanged(name):
    config, out_indices, compared = ZOO[name]
    default, nchw = build_pair(config, out_indices)
    inputs, samples = batch()
    seen = record_op_inputs(default)
    proposals = fixed_proposals(samples) if compared == 'roi' else None
    reference, _ = detector_outputs(nchw, inputs, samples, proposals)
    outputs, _ = detector_outputs(default, inputs, samples, proposals)
    assert seen, f'{name}: no layout-sensitive mmcv op ran'
    deviation = relative_deviation(reference, outputs)['max_rel']
    not_contiguous = sorted({op for op, contiguous in seen if not contiguous})
    assert not not_contiguous, f'{name}: {not_contiguous} received non-NCHW feature maps (deviation {deviation:.3g})'
    assert deviation < 1e-4


def test_backbone_outputs_are_nchw_contiguous_on_every_path():
    init_default_scope('mmdet')
    net = MODELS.build(dict(NARROW_BACKBONE, channels_last=True)).eval()
    x = _features(channels=3, size=(64, 96))
    outputs = [net(x)]
    with torch.no_grad():
        outputs.append(net(x))
        net.switch_to_deploy()
        outputs.append(net(x))  # the oneDNN fast path
        net.fast_inference = False
        outputs.append(net(x))
    for outs in outputs:
        assert all(o.is_contiguous() for o in outs)
