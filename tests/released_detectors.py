"""Stand-ins for the two detectors the VanillaNet authors released (mmdet 2.x checkpoints), and COCO-named data.

Not a test module. The key layout is written down here from the reference code, independently of this
project's model, so that a test which loads a stand-in into this project's configs can fail:

- backbone (reference ``object_detection/mmdet/models/backbones/vanillanet.py``, class ``Vanillanet``):
  ``stem1`` (4x4 conv + BN), ``stem2`` (1x1 conv + BN + activation), ``stages.{i}`` with ``conv1`` /
  ``conv2`` (1x1 conv + BN each) and ``act`` (a depthwise ``weight`` and a ``bn``; no bias), every BN a
  SyncBN (same keys as BN); VanillaNet-13 widths, act_num 4 (9x9 kernels);
- neck and heads: mmdet 2.x's FPN, RetinaHead (``retinanet_r50_fpn.py`` base, the reference RetinaNet
  config sets ``start_level=0`` and keeps ``add_extra_convs='on_input'``), RPNHead, Shared2FCBBoxHead and
  FCNMaskHead (``mask_rcnn_r50_fpn.py`` base), 80 COCO classes, 256 channels;
- the file: what mmcv 1.x's ``save_checkpoint`` writes from mmdet 2.x's ``train_detector``: ``meta``
  (``mmdet_version``, ``CLASSES``, ``env_info``, ``config``, ``seed``, ``exp_name``, ``hook_msgs``, ``epoch``,
  ``iter``, ``mmcv_version``, ``time``) and ``state_dict`` (an ``OrderedDict`` with ``_metadata``), the
  optimizer state removed as mmdet 2.x's ``publish_model.py`` removes it (which also writes torch's legacy,
  non-zip format).
"""
import json
import math
import os
import os.path as osp
import shutil
from collections import OrderedDict

import numpy as np
import torch

from mmdet.datasets import CocoDataset

RELEASES = 'https://github.com/huawei-noah/VanillaNet/releases/download/ckpt/'
DIMS = [512, 512, 1024] + [2048] * 7 + [4096, 4096]
ACT_NUM = 4
NUM_CLASSES = 80
WIDTH = 256
BN_SUFFIXES = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def _conv(shapes, name, out_channels, in_channels, kernel, bias=True):
    shapes[f'{name}.weight'] = (out_channels, in_channels, kernel, kernel)
    if bias:
        shapes[f'{name}.bias'] = (out_channels,)


def _bn(shapes, name, channels):
    for suffix in BN_SUFFIXES:
        shapes[f'{name}.{suffix}'] = () if suffix == 'num_batches_tracked' else (channels,)


def reference_backbone(shapes, dims=DIMS, act_num=ACT_NUM, prefix='backbone.'):
    kernel = 2 * act_num + 1
    _conv(shapes, f'{prefix}stem1.0', dims[0], 3, 4)
    _bn(shapes, f'{prefix}stem1.1', dims[0])
    _conv(shapes, f'{prefix}stem2.0', dims[0], dims[0], 1)
    _bn(shapes, f'{prefix}stem2.1', dims[0])
    shapes[f'{prefix}stem2.2.weight'] = (dims[0], 1, kernel, kernel)
    _bn(shapes, f'{prefix}stem2.2.bn', dims[0])
    for i, (width, out) in enumerate(zip(dims, dims[1:])):
        block = f'{prefix}stages.{i}'
        _conv(shapes, f'{block}.conv1.0', width, width, 1)
        _bn(shapes, f'{block}.conv1.1', width)
        _conv(shapes, f'{block}.conv2.0', out, width, 1)
        _bn(shapes, f'{block}.conv2.1', out)
        shapes[f'{block}.act.weight'] = (out, 1, kernel, kernel)
        _bn(shapes, f'{block}.act.bn', out)


def fpn(shapes, in_channels, start_level, num_outs, extra_on_input):
    used = in_channels[start_level:]
    for j, channels in enumerate(used):
        _conv(shapes, f'neck.lateral_convs.{j}.conv', WIDTH, channels, 1)
    for j in range(len(used)):
        _conv(shapes, f'neck.fpn_convs.{j}.conv', WIDTH, WIDTH, 3)
    if extra_on_input:
        for j in range(num_outs - len(used)):
            _conv(shapes, f'neck.fpn_convs.{len(used) + j}.conv', WIDTH, in_channels[-1] if j == 0 else WIDTH, 3)


def retina_head(shapes, stacked_convs=4, anchors=9):
    for branch in ('cls_convs', 'reg_convs'):
        for i in range(stacked_convs):
            _conv(shapes, f'bbox_head.{branch}.{i}.conv', WIDTH, WIDTH, 3)
    _conv(shapes, 'bbox_head.retina_cls', anchors * NUM_CLASSES, WIDTH, 3)
    _conv(shapes, 'bbox_head.retina_reg', anchors * 4, WIDTH, 3)


def mask_rcnn_heads(shapes, anchors=3, fc=1024, roi=7, mask_convs=4):
    _conv(shapes, 'rpn_head.rpn_conv', WIDTH, WIDTH, 3)
    _conv(shapes, 'rpn_head.rpn_cls', anchors, WIDTH, 1)
    _conv(shapes, 'rpn_head.rpn_reg', anchors * 4, WIDTH, 1)
    head = 'roi_head.bbox_head'
    shapes.update({f'{head}.fc_cls.weight': (NUM_CLASSES + 1, fc), f'{head}.fc_cls.bias': (NUM_CLASSES + 1,),
                   f'{head}.fc_reg.weight': (NUM_CLASSES * 4, fc), f'{head}.fc_reg.bias': (NUM_CLASSES * 4,),
                   f'{head}.shared_fcs.0.weight': (fc, WIDTH * roi * roi), f'{head}.shared_fcs.0.bias': (fc,),
                   f'{head}.shared_fcs.1.weight': (fc, fc), f'{head}.shared_fcs.1.bias': (fc,)})
    for i in range(mask_convs):
        _conv(shapes, f'roi_head.mask_head.convs.{i}.conv', WIDTH, WIDTH, 3)
    shapes['roi_head.mask_head.upsample.weight'] = (WIDTH, WIDTH, 2, 2)  # ConvTranspose2d: (in, out, k, k)
    shapes['roi_head.mask_head.upsample.bias'] = (WIDTH,)
    _conv(shapes, 'roi_head.mask_head.conv_logits', NUM_CLASSES, WIDTH, 1)


def retinanet_shapes():
    shapes = OrderedDict()
    reference_backbone(shapes)
    fpn(shapes, [1024, 2048, 4096], start_level=0, num_outs=5, extra_on_input=True)
    retina_head(shapes)
    return shapes


def mask_rcnn_shapes():
    shapes = OrderedDict()
    reference_backbone(shapes)
    fpn(shapes, [512, 1024, 2048, 4096], start_level=0, num_outs=5, extra_on_input=False)
    mask_rcnn_heads(shapes)
    return shapes


RELEASED = {
    'retinanet': dict(
        config='configs/retinanet_vanillanet13_1x.py', checkpoint='retinanet_vanillanet_13.pth',
        log='retinanet_vanillanet_13.log.json', exp_name='retinanet_vanillanet_13_mstrain_480-1024_adamw.py',
        shapes=retinanet_shapes, metrics=['bbox']),
    'mask-rcnn': dict(
        config='configs/mask-rcnn_vanillanet13_1x.py', checkpoint='mask_rcnn_vanillanet_13.pth',
        log='mask_rcnn_vanillanet_13.log.json', exp_name='mask_rcnn_vanillanet_13_mstrain_480-1024_adamw.py',
        shapes=mask_rcnn_shapes, metrics=['bbox', 'segm']),
}


def count_parameters(shapes):
    return sum(math.prod(shape) for key, shape in shapes.items()
               if not key.endswith(('running_mean', 'running_var', 'num_batches_tracked')))


def _module_versions(keys):
    """``_metadata`` as torch's ``state_dict()`` writes it: every module prefix -> its ``_version``."""
    metadata = OrderedDict([('', dict(version=1))])
    for key in keys:
        parts = key.split('.')[:-1]
        for end in range(1, len(parts) + 1):
            metadata.setdefault('.'.join(parts[:end]), dict(version=1))
        if key.endswith('running_mean'):
            metadata['.'.join(parts)] = dict(version=2)  # _BatchNorm._version
    return metadata


def random_state_dict(shapes, seed=0):
    """Random values of the given shapes: small conv weights, BN statistics around (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape in shapes.items():
        if key.endswith('num_batches_tracked'):
            value = torch.tensor(43980)
        elif key.endswith('running_var'):
            value = torch.rand(shape, generator=generator) + 0.5
        elif key.endswith(('running_mean', '.bias')):
            value = torch.randn(shape, generator=generator) * 0.05
        elif len(shape) == 1:  # BN weights
            value = 1 + torch.randn(shape, generator=generator) * 0.05
        else:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        state[key] = value
    state._metadata = _module_versions(state)
    return state


def write_released_checkpoint(name, path, seed=0):
    """Write a stand-in of the released ``name`` detector ('retinanet' or 'mask-rcnn') to ``path``.

    RetinaNet: zip format, ``seed`` a numpy integer (mmdet 2.x's ``init_random_seed`` on one process);
    Mask R-CNN: torch's legacy format (as ``publish_model.py`` writes), ``seed`` a Python int.
    """
    spec = RELEASED[name]
    meta = dict(
        mmdet_version='2.25.1+ddbe6b9', CLASSES=CocoDataset.METAINFO['classes'],
        env_info='sys.platform: linux\nPython: 3.8.13\nCUDA available: True\nGPU 0,1,2,3,4,5,6,7: Tesla V100-SXM2-32GB'
                 '\nPyTorch: 1.10.0\nMMCV: 1.6.0\nMMDetection: 2.25.1+ddbe6b9',
        config=f"_base_ = ['../_base_/models/{name.replace('-', '_')}_r50_fpn.py']\n"
               "model = dict(backbone=dict(_delete_=True, type='Vanillanet', act_num=4, ...))\n",
        seed=np.int64(1234567) if name == 'retinanet' else 1234567, exp_name=spec['exp_name'],
        hook_msgs=dict(last_ckpt=f'work_dirs/{spec["exp_name"][:-3]}/epoch_11.pth'),
        epoch=12, iter=43980, mmcv_version='1.6.0', time='Wed May 31 08:00:00 2023')
    checkpoint = dict(meta=meta, state_dict=random_state_dict(spec['shapes'](), seed))
    torch.save(checkpoint, path, _use_new_zipfile_serialization=name == 'retinanet')
    return str(path)


# five COCO classes stand in for the synthetic shapes
COCO_NAMES_OF_SHAPES = {'circle': 'sports ball', 'square': 'tv', 'triangle': 'kite', 'star': 'frisbee',
                        'cross': 'airplane'}
# COCO's category ids: 1..90 with gaps; the 80 names in order
COCO_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
            33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
            60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]


def coco_layout(synthetic_root, coco_root, splits=('train', 'val')):
    """Copy a synthetic shapes dataset into mmdet's COCO layout (``train2017/``, ``annotations/instances_*2017.json``)
    with COCO's 80 categories, so that the recipe configs read it unchanged."""
    classes = CocoDataset.METAINFO['classes']
    coco_id = dict(zip(classes, COCO_IDS))
    for split in splits:
        with open(osp.join(synthetic_root, 'annotations', f'instances_{split}.json')) as f:
            data = json.load(f)
        renamed = {c['id']: coco_id[COCO_NAMES_OF_SHAPES[c['name']]] for c in data['categories']}
        data['categories'] = [dict(id=coco_id[name], name=name, supercategory='coco') for name in classes]
        for ann in data['annotations']:
            ann['category_id'] = renamed[ann['category_id']]
        os.makedirs(osp.join(coco_root, 'annotations'), exist_ok=True)
        with open(osp.join(coco_root, 'annotations', f'instances_{split}2017.json'), 'w') as f:
            json.dump(data, f)
        shutil.copytree(osp.join(synthetic_root, split), osp.join(coco_root, f'{split}2017'), dirs_exist_ok=True)
    return coco_root
