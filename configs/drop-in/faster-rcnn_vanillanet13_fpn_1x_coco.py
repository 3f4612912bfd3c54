# mmdet's Faster R-CNN R-50 FPN 1x with a VanillaNet-13 backbone. Everything else is mmdet's
# (data, 16 images per step, step schedule) except the optimizer: AdamW with layer-wise lr decay,
# the VanillaNet recipe's lr scaled linearly from 32 to mmdet's 16 images per step.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmdet_vanillanet'], allow_failed_imports=False)

# Get it from
#   https://github.com/huawei-noah/VanillaNet/releases/download/ckpt/vanillanet_13_act_num_4_kd_pretrain.pth
# or point at your copy with --cfg-options model.backbone.init_cfg.checkpoint=/path/to/it.pth
pretrained = 'checkpoints/vanillanet_13_act_num_4_kd_pretrain.pth'

model = dict(
    backbone=dict(
        _delete_=True,
        type='VanillaNet',
        arch='vanillanet_13',
        act_num=4,
        out_indices=(0, 1, 8, 10),  # strides 4/8/16/32
        norm_cfg=dict(type='BN', eps=1e-6),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[512, 1024, 2048, 4096]))

sync_bn = 'torch'

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='VanillaNetLayerDecayOptimizerConstructor',
    optimizer=dict(type='AdamW', lr=6.5e-5, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.6, num_layers=6))

# Exact resume after an interruption (tools/train.py --resume): saves and restores every random state.
custom_hooks = [dict(type='RandomStateHook')]
