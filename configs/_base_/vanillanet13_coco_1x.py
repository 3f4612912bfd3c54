# What the two VanillaNet-13 COCO recipes share: the VanillaNet paper's detection recipe without the
# detector. The plugin, the ImageNet weights, SyncBN, multi-scale training, AdamW with layer-wise lr decay,
# the 12-epoch schedule and the hooks; each recipe adds its detector, its backbone outputs and its lr.
_base_ = ['mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py']

custom_imports = dict(imports=['mmdet_vanillanet'], allow_failed_imports=False)

# ImageNet weights of VanillaNet-13 with act_num=4 (9x9 activations), trained by knowledge
# distillation. Download them from
#   https://github.com/huawei-noah/VanillaNet/releases/download/ckpt/vanillanet_13_act_num_4_kd_pretrain.pth
# into checkpoints/, or point at your copy with
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/vanillanet_13_act_num_4_kd_pretrain.pth
# Only training from them reads the file: tools/train.py stops before reading any data when it is missing.
pretrained = 'checkpoints/vanillanet_13_act_num_4_kd_pretrain.pth'

# Plain BN in the model, so single-device runs work; `sync_bn` turns every BN into SyncBN when training
# on more than one GPU.
sync_bn = 'torch'

# Multi-scale training: short side 480 ... 1024 in steps of 32, long side at most 1333.
multiscale_resize = dict(
    type='RandomChoiceResize', scales=[(1333, short) for short in range(480, 1025, 32)], keep_ratio=True)

# AdamW with layer-wise lr decay 0.6 over the backbone (stem: layer 0, block k: k // 2 + 1, neck and
# heads: full lr); biases and norms get no weight decay. The lr is RetinaNet's, for 32 images per step.
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

# The lr is for 32 images per step (8 GPUs x 4); --auto-scale-lr scales it to other totals.
auto_scale_lr = dict(enable=False, base_batch_size=32)

# Stop at the first NaN or infinite loss; exact resume after an interruption.
custom_hooks = [dict(type='CheckInvalidLossHook', interval=1), dict(type='RandomStateHook')]
