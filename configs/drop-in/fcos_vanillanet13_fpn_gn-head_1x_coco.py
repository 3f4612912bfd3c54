# mmdet's FCOS (GN head) 1x with a VanillaNet-13 backbone. Everything else is mmdet's (data,
# 16 images per step, schedule, gradient clipping) except
# - the input normalisation: ImageNet RGB mean/std, as VanillaNet was trained (mmdet's FCOS
#   config normalises for a Caffe-style ResNet);
# - the optimizer: AdamW with layer-wise lr decay, the VanillaNet RetinaNet recipe's lr scaled
#   linearly from 32 to mmdet's 16 images per step.
_base_ = ['mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', '../_base_/models/vanillanet13.py']

model = dict(
    data_preprocessor=dict(
        mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
    # strides 8/16/32
    backbone=dict(_base_.vanillanet13_backbone, _delete_=True, out_indices=(1, 8, 10)),
    # mmdet's FCOS skips ResNet's stride-4 level with start_level=1; VanillaNet gives no
    # stride-4 output here, so the FPN starts at level 0. P6 and P7 come from P5 as in mmdet.
    neck=dict(in_channels=[1024, 2048, 4096], start_level=0))

optim_wrapper = dict(
    _base_.vanillanet13_optim_wrapper,
    _delete_=True,
    optimizer=dict(_base_.vanillanet13_optim_wrapper.optimizer, lr=4e-5),
    clip_grad=dict(max_norm=35, norm_type=2))

# Exact resume after an interruption (tools/train.py --resume): saves and restores every random state.
custom_hooks = [dict(type='RandomStateHook')]
