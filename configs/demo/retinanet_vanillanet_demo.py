# RetinaNet with a narrow VanillaNet trained from scratch on the synthetic shapes dataset
# (configs/demo/_base_/synthetic_shapes.py); sized for a CPU: `make demo` trains and evaluates it in minutes.
_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py', './_base_/synthetic_shapes.py']

max_epochs = 20

model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(_base_.demo_backbone, _delete_=True),
    neck=dict(in_channels=[96, 128, 192], out_channels=64, start_level=0, add_extra_convs='on_input',
              num_outs=3),
    bbox_head=dict(
        num_classes=5,
        in_channels=64,
        feat_channels=64,
        stacked_convs=2,
        anchor_generator=dict(octave_base_scale=3, scales_per_octave=2, strides=[8, 16, 32]),
        reg_decoded_bbox=True,
        loss_bbox=dict(_delete_=True, type='GIoULoss', loss_weight=2.0)),
    test_cfg=dict(score_thr=0.05, max_per_img=50))

train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, eta_min_ratio=0.01,
         convert_to_iter_based=True),
]
default_hooks = dict(checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
