# Mask R-CNN with a narrow VanillaNet trained from scratch on the synthetic shapes dataset
# (configs/demo/_base_/synthetic_shapes.py); `make demo-mask` trains, evaluates (bbox + segm) and fuses it on a
# CPU. Measured on 2 cores: about 11 minutes in all, bbox_mAP 0.59 and segm_mAP 0.53 on the 100 val images.
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', './_base_/synthetic_shapes.py']

max_epochs = 12
num_classes = 5

# The demos' backbone; FPN adds a max-pooled level at stride 64 for the RPN.
model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(_base_.demo_backbone, _delete_=True),
    neck=dict(in_channels=[96, 128, 192], out_channels=64, num_outs=4),
    # one square anchor per position: the shapes' boxes are close to square, and the RPN costs a third
    rpn_head=dict(in_channels=64, feat_channels=64,
                  anchor_generator=dict(scales=[4], ratios=[1.0], strides=[8, 16, 32, 64])),
    roi_head=dict(
        # RoIs under 56 px pool from stride 8, under 112 px from 16, larger ones from 32
        bbox_roi_extractor=dict(out_channels=64, featmap_strides=[8, 16, 32], finest_scale=28),
        bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=64, featmap_strides=[8, 16, 32], finest_scale=28),
        mask_head=dict(num_convs=2, in_channels=64, conv_out_channels=64, num_classes=num_classes)),
    # few objects per image: 100 proposals and 32 sampled RoIs (up to 8 positives) per image suffice
    train_cfg=dict(rpn_proposal=dict(nms_pre=300, max_per_img=100),
                   rcnn=dict(sampler=dict(num=32))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=100), rcnn=dict(max_per_img=50)))

# the shapes' masks, in both pipelines
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale={{_base_.image_size}}, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale={{_base_.image_size}}, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(metric=['bbox', 'segm'])
test_evaluator = val_evaluator

train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, eta_min_ratio=0.01,
         convert_to_iter_based=True),
]
default_hooks = dict(checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
