# Mask R-CNN with a VanillaNet-13 backbone on COCO, 12 epochs: the VanillaNet paper's recipe
# (configs/_base_/vanillanet13_coco_1x.py: what it shares with RetinaNet).
#
# 32 images per step: 8 GPUs x 4 images (see docs for other splits and --auto-scale-lr).
#   bash tools/dist_train.sh configs/mask-rcnn_vanillanet13_1x.py 8
# AMP: configs/mask-rcnn_vanillanet13_1x_amp.py, or --amp on this config.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'mmdet::_base_/datasets/coco_instance.py',
    './_base_/vanillanet13_coco_1x.py'
]

model = dict(
    # Blocks 0, 1, 8 and 10: strides 4/8/16/32 with 512/1024/2048/4096 channels.
    backbone=dict(_base_.vanillanet13_backbone, _delete_=True, out_indices=(0, 1, 8, 10)),
    neck=dict(in_channels=[512, 1024, 2048, 4096]))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    {{_base_.multiscale_resize}},
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
# Testing stays mmdet's: single scale 1333x800, COCO bbox and segm metrics.
train_dataloader = dict(batch_size=4, dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(optimizer=dict(lr=1.3e-4))
