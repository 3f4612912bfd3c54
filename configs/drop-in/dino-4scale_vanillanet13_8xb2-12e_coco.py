# mmdet's DINO (4 scales) 12 epochs with a VanillaNet-13 backbone. Everything else is mmdet's
# (data, 16 images per step, AdamW lr 1e-4 and weight decay 1e-4, gradient clipping, schedule)
# except that the backbone's lr follows VanillaNet's layer-wise decay (0.6) instead of mmdet's
# flat 0.1 multiplier.
_base_ = ['mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py', '../_base_/models/vanillanet13.py']

model = dict(
    # strides 8/16/32; the neck adds the 4th scale (stride 64)
    backbone=dict(_base_.vanillanet13_backbone, _delete_=True, out_indices=(1, 8, 10)),
    neck=dict(in_channels=[1024, 2048, 4096]))

optim_wrapper = dict(
    constructor=_base_.vanillanet13_optim_wrapper.constructor,
    paramwise_cfg=dict(_base_.vanillanet13_optim_wrapper.paramwise_cfg, _delete_=True))

# Exact resume after an interruption (tools/train.py --resume): saves and restores every random state.
custom_hooks = [dict(type='RandomStateHook')]
