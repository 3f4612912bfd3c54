# mmdet's DINO (4 scales) 12 epochs with a VanillaNet-13 backbone. Everything else is mmdet's
# (data, 16 images per step, AdamW lr 1e-4 and weight decay 1e-4, gradient clipping, schedule)
# except that the backbone's lr follows VanillaNet's layer-wise decay (0.6) instead of mmdet's
# flat 0.1 multiplier.
_base_ = 'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py'

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
        out_indices=(1, 8, 10),  # strides 8/16/32; the neck adds the 4th scale (stride 64)
        norm_cfg=dict(type='BN', eps=1e-6),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[1024, 2048, 4096]))

sync_bn = 'torch'

optim_wrapper = dict(
    constructor='VanillaNetLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(_delete_=True, decay_rate=0.6, num_layers=6))

# Exact resume after an interruption (tools/train.py --resume): saves and restores every random state.
custom_hooks = [dict(type='RandomStateHook')]
