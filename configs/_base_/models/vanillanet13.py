# VanillaNet-13 for detection, written once: the plugin import, the ImageNet weights, the backbone, SyncBN
# and the optimizer with layer-wise lr decay. Named values, not `model` or `optim_wrapper`: those come from
# mmdet's bases beside this one, and each config puts these values into its own.
custom_imports = dict(imports=['mmdet_vanillanet'], allow_failed_imports=False)

# ImageNet weights of VanillaNet-13 with act_num=4 (9x9 activations), trained by knowledge
# distillation. Download them from
#   https://github.com/huawei-noah/VanillaNet/releases/download/ckpt/vanillanet_13_act_num_4_kd_pretrain.pth
# into checkpoints/, or point at your copy with
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/vanillanet_13_act_num_4_kd_pretrain.pth
# Only training from them reads the file: tools/train.py stops before reading any data when it is missing.
pretrained = 'checkpoints/vanillanet_13_act_num_4_kd_pretrain.pth'

# Every config adds its `out_indices` (and `_delete_=True`, to drop the ResNet keys of mmdet's base).
vanillanet13_backbone = dict(
    type='VanillaNet',
    arch='vanillanet_13',
    act_num=4,
    norm_cfg=dict(type='BN', eps=1e-6),
    init_cfg=dict(type='Pretrained', checkpoint=pretrained))

# Plain BN in the model, so single-device runs work; `sync_bn` turns every BN into SyncBN when training
# on more than one GPU.
sync_bn = 'torch'

# AdamW with layer-wise lr decay 0.6 over the backbone (stem: layer 0, block k: k // 2 + 1, neck and
# heads: full lr); biases and norms get no weight decay. The lr is RetinaNet's, for 32 images per step.
vanillanet13_optim_wrapper = dict(
    type='OptimWrapper',
    constructor='VanillaNetLayerDecayOptimizerConstructor',
    optimizer=dict(type='AdamW', lr=8e-5, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.6, num_layers=6))
