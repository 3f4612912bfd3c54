# RetinaNet with a VanillaNet-13 backbone on COCO, 12 epochs: the VanillaNet paper's recipe.
#
# 32 images per step: 8 GPUs x 4 images (see docs for other splits and --auto-scale-lr).
#   bash tools/dist_train.sh configs/retinanet_vanillanet13_1x.py 8
# AMP: configs/retinanet_vanillanet13_1x_amp.py, or --amp on this config.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmdet_vanillanet'], allow_failed_imports=False)

# ImageNet weights of VanillaNet-13 with act_num=4 (9x9 activations), trained by knowledge
# distillation. Download them from
#   https://github.com/huawei-noah/VanillaNet/releases/download/ckpt/vanillanet_13_act_num_4_kd_pretrain.pth
# into checkpoints/, or point at your copy with
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/vanillanet_13_act_num_4_kd_pretrain.pth
# A missing file stops the run when the model is built, before any data is read.
pretrained = 'checkpoints/vanillanet_13_act_num_4_kd_pretrain.pth'

model = dict(
    backbone=dict(
        _delete_=True,
        type='VanillaNet',
        arch='vanillanet_13',
        act_num=4,
        # Blocks 1, 8 and 10: strides 8/16/32 with 1024/2048/4096 channels.
        out_indices=(1, 8, 10),
        # Plain BN here so single-device runs work; `sync_bn` below turns every BN into SyncBN
        # when training on more than one GPU.
        norm_cfg=dict(type='BN', eps=1e-6),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[1024, 2048, 4096], start_level=0, num_outs=5))

sync_bn = 'torch'

# Multi-scale training: short side 480 ... 1024 in steps of 32, long side at most 1333; flip.
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='RandomChoiceResize',
        scales=[(1333, 480), (1333, 512), (1333, 544), (1333, 576), (1333, 608),
                (1333, 640), (1333, 672), (1333, 704), (1333, 736), (1333, 768),
                (1333, 800), (1333, 832), (1333, 864), (1333, 896), (1333, 928),
                (1333, 960), (1333, 992), (1333, 1024)],
        keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
# Testing stays mmdet's: single scale 1333x800, COCO bbox metric.
train_dataloader = dict(batch_size=4, dataset=dict(pipeline=train_pipeline))

# AdamW with layer-wise lr decay 0.6 over the backbone (stem: layer 0, block k: k // 2 + 1,
# neck and head: full lr); biases and norms get no weight decay.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='VanillaNetLayerDecayOptimizerConstructor',
    optimizer=dict(type='AdamW', lr=8e-5, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.6, num_layers=6))

# 12 epochs: linear warm-up over the first 500 iterations, and a linear decay of the lr from
# its full value to 0 over the whole run, updated every iteration. The two overlap during the
# warm-up, where their factors multiply.
max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(
        type='LinearLR',
        start_factor=1.0,
        end_factor=0.0,
        by_epoch=True,
        begin=0,
        end=max_epochs,
        convert_to_iter_based=True)
]

# The lr above is for 32 images per step; --auto-scale-lr scales it to other totals.
auto_scale_lr = dict(enable=False, base_batch_size=32)

# Stop at the first NaN or infinite loss.
custom_hooks = [dict(type='CheckInvalidLossHook', interval=1), dict(type='RandomStateHook')]
