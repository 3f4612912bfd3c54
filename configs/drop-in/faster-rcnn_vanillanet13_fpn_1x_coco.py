# mmdet's Faster R-CNN R-50 FPN 1x with a VanillaNet-13 backbone. Everything else is mmdet's
# (data, 16 images per step, step schedule) except the optimizer: AdamW with layer-wise lr decay,
# the VanillaNet recipe's lr scaled linearly from 32 to mmdet's 16 images per step.
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', '../_base_/models/vanillanet13.py']

model = dict(
    # strides 4/8/16/32
    backbone=dict(_base_.vanillanet13_backbone, _delete_=True, out_indices=(0, 1, 8, 10)),
    neck=dict(in_channels=[512, 1024, 2048, 4096]))

optim_wrapper = dict(
    _base_.vanillanet13_optim_wrapper,
    _delete_=True,
    optimizer=dict(_base_.vanillanet13_optim_wrapper.optimizer, lr=6.5e-5))

# Exact resume after an interruption (tools/train.py --resume): saves and restores every random state.
custom_hooks = [dict(type='RandomStateHook')]
