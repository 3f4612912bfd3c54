# What the two VanillaNet-13 COCO recipes share: the VanillaNet paper's detection recipe without the
# detector. The plugin, the ImageNet weights, SyncBN and AdamW with layer-wise lr decay (from
# models/vanillanet13.py), multi-scale training, the 12-epoch schedule and the hooks; each recipe adds its
# detector, its backbone outputs and its lr.
_base_ = [
    'mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py', './models/vanillanet13.py'
]

# Multi-scale training: short side 480 ... 1024 in steps of 32, long side at most 1333.
multiscale_resize = dict(
    type='RandomChoiceResize', scales=[(1333, short) for short in range(480, 1025, 32)], keep_ratio=True)

# in place of schedule_1x's SGD
optim_wrapper = dict(_base_.vanillanet13_optim_wrapper, _delete_=True)

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
