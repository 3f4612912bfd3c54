# mask-rcnn_vanillanet13_1x.py with automatic mixed precision (fp16, dynamic loss scale; CUDA).
# Same as `tools/train.py configs/mask-rcnn_vanillanet13_1x.py --amp`.
_base_ = './mask-rcnn_vanillanet13_1x.py'

optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
