# mmdet's FCOS (GN head) 1x with a VanillaNet-13 backbone. Everything else is mmdet's (data,
# 16 images per step, schedule, gradient clipping) except
# - the input normalisation: ImageNet RGB mean/std, as VanillaNet was trained (mmdet's FCOS
#   config normalises for a Caffe-style ResNet);
# - the optimizer: AdamW with layer-wise lr decay, the VanillaNet RetinaNet recipe's lr scaled
#   linearly from 32 to mmdet's 16 images per step.
_base_ = 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'

custom_imports = dict(imports=['mmdet_vanillanet'], allow_failed_imports=False)

# Get it from
#   https://github.com/huawei-noah/VanillaNet/releases/download/ckpt/vanillanet_13_act_num_4_kd_pretrain.pth
# or point at your copy with --cfg-options model.backbone.init_cfg.checkpoint=/path/to/it.pth
pretrained = 'checkpoints/vanillanet_13_act_num_4_kd_pretrain.pth'

model = dict(
    data_preprocessor=dict(
        mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
    backbone=dict(
        _delete_=True,
        type='VanillaNet',
        arch='vanillanet_13',
        act_num=4,
        out_indices=(1, 8, 10),  # strides 8/16/32
        norm_cfg=dict(type='BN', eps=1e-6),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    # mmdet's FCOS skips ResNet's stride-4 level with start_level=1; VanillaNet gives no
    # stride-4 output here, so the FPN starts at level 0. P6 and P7 come from P5 as in mmdet.
    neck=dict(in_channels=[1024, 2048, 4096], start_level=0))

sync_bn = 'torch'

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='VanillaNetLayerDecayOptimizerConstructor',
    optimizer=dict(type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.6, num_layers=6),
    clip_grad=dict(max_norm=35, norm_type=2))

# Exact resume after an interruption (tools/train.py --resume): saves and restores every random state.
custom_hooks = [dict(type='RandomStateHook')]
