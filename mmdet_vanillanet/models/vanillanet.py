"""VanillaNet backbone (Chen et al., NeurIPS 2023) for MMDetection 3.x.

Paper: "VanillaNet: the Power of Minimalism in Deep Learning", H. Chen, Y. Wang, J. Guo, D. Tao,
arXiv:2305.12972. Reference implementation (MIT licence): https://github.com/huawei-noah/VanillaNet; the
network's facts (widths, strides, the series activation, the fusion) follow it, the code here is this
project's own.

A plain stack: a stem, then ``len(strides)`` blocks of 1x1 convs, pooling and a series-informed
activation. Parameter names follow the published checkpoints in both the training structure and the
fused deploy structure, so official weights load without renaming.
"""
import math
import numbers
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.logging import print_log
from mmengine.model import BaseModule, constant_init, initialize, trunc_normal_init
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import skip_init
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.utils.checkpoint import checkpoint

from mmdet.registry import MODELS

from ..arch import STEM_KERNEL, resolve_arch
from ..checkpoint.pretrained import check_pretrained_init_cfg, load_pretrained_backbone, split_pretrained_init_cfg
from ..checkpoint.state_dict_selection import CLASSIFIER_KEY
from ..checkpoint.weights_fit import check_backbone_state_dict
from . import onednn_inference
from .execution import Execution, choose_execution


def _conv_bn(in_channels, out_channels, kernel_size, stride, padding, norm_cfg):
    """``nn.Sequential(conv, norm)``: indices 0 and 1 match the published ``*.0.*`` / ``*.1.*`` keys."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding),
        build_norm_layer(norm_cfg, out_channels)[1])


def _fold_bn(weight, bias, norm):
    """Fold an eval-mode BatchNorm into the conv weight and bias that precede it (bias may be None)."""
    return fuse_conv_bn_weights(weight, bias, norm.running_mean, norm.running_var, norm.eps,
                                norm.weight, norm.bias)


def _fused_conv_bn(conv_bn):
    return _fold_bn(conv_bn[0].weight, conv_bn[0].bias, conv_bn[1])


def _merge_with_1x1(first_weight, first_bias, second_weight, second_bias):
    """Weight and bias of ``conv2(conv1(x))`` when conv2 is 1x1 and nothing non-linear lies between."""
    second = second_weight.flatten(1)
    weight = torch.einsum('oc,cikl->oikl', second, first_weight)
    bias = second @ first_bias + second_bias
    return weight, bias


def _new_conv(in_channels, out_channels, kernel_size, stride, padding, weight, bias):
    """A Conv2d holding ``weight`` and ``bias`` (no random init drawn: fusing leaves the random state alone)."""
    conv = skip_init(nn.Conv2d, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                     device=weight.device)
    conv.weight = nn.Parameter(weight.detach().clone().contiguous())
    conv.bias = nn.Parameter(bias.detach().clone().contiguous())
    return conv


class SeriesActivation(nn.Module):
    """Series-informed activation: ReLU, then a depthwise (2n+1)x(2n+1) conv, then BN.

    In deploy form the BN is folded into the depthwise conv, which then carries a bias.

    Args:
        channels (int): number of channels.
        act_num (int): n; the depthwise kernel is (2n+1)x(2n+1) with padding n.
        norm_cfg (dict): norm layer config (training structure only).
        deploy (bool): build the fused form (``weight`` and ``bias``, no ``bn``).
    """

    def __init__(self, channels, act_num, norm_cfg, deploy=False):
        super().__init__()
        self.channels = channels
        self.act_num = act_num
        self.deploy = deploy
        size = 2 * act_num + 1
        self.weight = nn.Parameter(torch.zeros(channels, 1, size, size))
        if deploy:
            self.bias = nn.Parameter(torch.zeros(channels))
        else:
            self.bias = None
            self.bn = build_norm_layer(norm_cfg, channels)[1]

    def forward(self, x):
        x = F.conv2d(F.relu(x), self.weight, self.bias, padding=self.act_num, groups=self.channels)
        return x if self.deploy else self.bn(x)

    @torch.no_grad()
    def switch_to_deploy(self):
        if self.deploy:
            return
        weight, bias = _fold_bn(self.weight, None, self.bn)
        self.weight = nn.Parameter(weight.detach().clone().contiguous())
        self.bias = nn.Parameter(bias.detach().clone().contiguous())
        del self.bn
        self.deploy = True


class AdaptiveHalfMaxPool(nn.Module):
    """Adaptive max pool to ceil(h/2) x ceil(w/2): the released ada-pool targets (38, 19, 10 at 224)."""

    def forward(self, x):
        h, w = x.shape[-2:]
        return F.adaptive_max_pool2d(x, (math.ceil(h / 2), math.ceil(w / 2)))


def _make_pool(stride, adaptive):
    if adaptive:
        return AdaptiveHalfMaxPool()
    return nn.Identity() if stride == 1 else nn.MaxPool2d(stride)


class VanillaBlock(nn.Module):
    """One VanillaNet block.

    Training structure: ``conv1`` (1x1 conv + BN), leaky ReLU with slope ``act_learn``, ``conv2``
    (1x1 conv + BN), pool, ``act``. Deploy structure: ``conv`` (one 1x1 conv), pool, ``act``.

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        stride (int): pooling stride (1 = no pooling).
        act_num (int): n of the series activation.
        norm_cfg (dict): norm layer config.
        deploy (bool): build the fused structure.
        adaptive_pool (bool): pool to ceil(h/2) x ceil(w/2) adaptively instead of MaxPool(stride).
    """

    def __init__(self, in_channels, out_channels, stride, act_num, norm_cfg, deploy=False,
                 adaptive_pool=False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.deploy = deploy
        self.act_learn = 1.0
        if deploy:
            self.conv = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.conv1 = _conv_bn(in_channels, in_channels, 1, 1, 0, norm_cfg)
            self.conv2 = _conv_bn(in_channels, out_channels, 1, 1, 0, norm_cfg)
        self.pool = _make_pool(stride, adaptive_pool)
        self.act = SeriesActivation(out_channels, act_num, norm_cfg, deploy)

    def forward(self, x):
        if self.deploy:
            x = self.conv(x)
        else:
            x = self.conv1(x)
            if self.act_learn != 1:
                x = F.leaky_relu(x, self.act_learn)
            x = self.conv2(x)
        return self.act(self.pool(x))

    @torch.no_grad()
    def switch_to_deploy(self):
        if self.deploy:
            return
        weight, bias = _merge_with_1x1(*_fused_conv_bn(self.conv1), *_fused_conv_bn(self.conv2))
        self.conv = _new_conv(self.in_channels, self.out_channels, 1, 1, 0, weight, bias)
        del self.conv1, self.conv2
        self.act.switch_to_deploy()
        self.deploy = True


@contextmanager
def _bn_statistics_restored(module):
    """Undo whatever the enclosed code does to the BN running statistics inside ``module``.

    Wraps the recomputation of activation checkpointing, so running statistics move once per step,
    exactly as without checkpointing.
    """
    buffers = [buf for m in module.modules() if isinstance(m, _BatchNorm) for buf in m.buffers()]
    saved = [buf.clone() for buf in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in zip(buffers, saved):
                buf.copy_(value)


@MODELS.register_module()
class VanillaNet(BaseModule):
    """VanillaNet backbone.

    Args:
        arch (str | dict): one of ``ARCH_SETTINGS`` (``vanillanet_5`` ... ``vanillanet_13``,
            ``vanillanet_13_x1_5``, ``vanillanet_13_x1_5_ada_pool``) or a dict with ``dims``,
            ``strides`` and optionally ``ada_pool`` (see :func:`resolve_arch`). Default: 'vanillanet_5'.
        act_num (int): n of the series activation ((2n+1)x(2n+1) depthwise kernels). Default: 3.
        in_channels (int): input image channels. Default: 3.
        out_indices (Sequence[int] | None): blocks whose outputs are returned, counted from 0 as the
            reference configs do; strictly increasing. None returns the last block. Default: None.
        frozen_stages (int): -1 freezes nothing; 0 freezes the stem; k >= 1 freezes the stem and
            blocks 0 ... k-1. Frozen parts get no gradients and keep their BN statistics (eval mode).
            Default: -1.
        norm_eval (bool): keep every BN layer in eval mode while training. Default: False.
        norm_cfg (dict): norm layer config; ``eps`` defaults to 1e-6. Default: ``dict(type='BN', eps=1e-6)``.
        with_cp (bool): activation checkpointing per block: same outputs and gradients, less memory.
            Default: False.
        deploy (bool): build the fused deploy structure directly. Default: False.
        channels_last (bool): run the network in channels-last memory format inside; depthwise convs,
            and so the series activation, are several times faster so on CPU. The layout stays inside:
            the outputs are ordinary NCHW-contiguous tensors, because mmcv's RoIAlign and deformable
            convs read their input's memory as NCHW (channels-last maps give wrong RoI features silently,
            or "input must be contiguous"). The one exception is bf16 inference inside
            :func:`mmdet_vanillanet.precision.channels_last_detector`, which hands channels-last maps to
            the neck and feeds every mmcv op NCHW. Default: True.
        fast_inference (bool): fused structure only: on CPU, without autograd (``torch.no_grad`` /
            ``torch.inference_mode``), run the network through oneDNN's convolutions with every ReLU fused
            into the conv before it: in fp32 on oneDNN's blocked layout (nChw16c), where its direct
            depthwise kernel runs the series activation fast; under ``torch.autocast('cpu',
            dtype=torch.bfloat16)`` in bf16 on channels-last tensors, with the fused weights converted to bf16
            once (a CPU without native bf16 emulates it, with one warning). Same operations, same outputs up
            to float rounding. Everything else (training, gradients, CUDA, tracing, ONNX export,
            ``torch.compile``, the ada-pool variant, forward hooks on a submodule, a torch build whose oneDNN
            ops fail a one-time probe) takes the plain path;
            :func:`mmdet_vanillanet.models.execution.choose_execution` is that decision. Default: True.
        init_cfg (dict | list[dict] | None): mmengine init config; ``None`` means the paper's
            from-scratch init (truncated normal std 0.02, biases 0). Default: None.

    Example:
        >>> import torch
        >>> from mmdet_vanillanet.models import VanillaNet
        >>> net = VanillaNet(arch='vanillanet_5', act_num=3, out_indices=(0, 1, 2)).eval()
        >>> net.out_channels, net.out_strides
        ([1024, 2048, 4096], [8, 16, 32])
        >>> for out in net(torch.rand(1, 3, 224, 224)):
        ...     print(tuple(out.shape))
        (1, 1024, 28, 28)
        (1, 2048, 14, 14)
        (1, 4096, 7, 7)
    """

    def __init__(self,
                 arch='vanillanet_5',
                 act_num=3,
                 in_channels=3,
                 out_indices=None,
                 frozen_stages=-1,
                 norm_eval=False,
                 norm_cfg=dict(type='BN', eps=1e-6),
                 with_cp=False,
                 deploy=False,
                 channels_last=True,
                 fast_inference=True,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if isinstance(act_num, bool) or not isinstance(act_num, numbers.Real):
            raise TypeError(f'act_num must be an integer >= 1 (n of the (2n+1)x(2n+1) activation kernels; the '
                            f'published weights use 3, the detection configs 4), got {act_num!r}.')
        if not isinstance(norm_cfg, dict):
            raise TypeError(f"norm_cfg must be a dict such as dict(type='BN', eps=1e-6), got {norm_cfg!r}: every "
                            'conv of the training structure is followed by a norm layer, which fusing folds into it.')
        if 'type' not in norm_cfg:
            raise ValueError(f"norm_cfg needs a 'type' (e.g. 'BN', 'SyncBN'), got {norm_cfg!r}.")
        split_pretrained_init_cfg(init_cfg)  # validates its keys; the file is read by init_weights only
        settings = resolve_arch(arch)
        self.arch_name = arch if isinstance(arch, str) else None
        self.dims, self.strides, self.ada_pool = settings['dims'], settings['strides'], settings['ada_pool']
        self.num_blocks = len(self.strides)
        if not math.isfinite(act_num) or int(act_num) != act_num or act_num < 1:
            raise ValueError(f'act_num must be an integer >= 1 (kernel (2n+1)x(2n+1)), got {act_num!r}.')
        self.act_num = int(act_num)
        self.in_channels = in_channels
        self.out_indices = self._check_out_indices(out_indices)
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= self.num_blocks:
            raise ValueError(f'frozen_stages must be an int in [-1, {self.num_blocks}] (-1: none, 0: stem, '
                             f'k: stem and blocks 0..k-1), got {frozen_stages!r}.')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.norm_cfg = dict(norm_cfg)
        self.norm_cfg.setdefault('eps', 1e-6)
        self.with_cp = with_cp
        self.deploy = deploy
        self.channels_last = channels_last
        self.fast_inference = fast_inference
        # set by precision.channels_last.channels_last_detector only, whose guards make this safe for mmcv's ops
        self.channels_last_outputs = False
        self._act_learn = 1.0
        self._build_layers()
        self._freeze_stages()

    def _build_layers(self):
        """The stem and the blocks, in the training or the deploy structure, named as the published weights."""
        self.stem_stride, stem_padding = (3, 1) if self.ada_pool else (STEM_KERNEL, 0)
        c0 = self.dims[0]
        if self.deploy:
            self.stem = nn.Sequential(
                nn.Conv2d(self.in_channels, c0, STEM_KERNEL, stride=self.stem_stride, padding=stem_padding),
                SeriesActivation(c0, self.act_num, self.norm_cfg, deploy=True))
        else:
            self.stem1 = _conv_bn(self.in_channels, c0, STEM_KERNEL, self.stem_stride, stem_padding, self.norm_cfg)
            self.stem2 = nn.Sequential(
                nn.Conv2d(c0, c0, 1), build_norm_layer(self.norm_cfg, c0)[1],
                SeriesActivation(c0, self.act_num, self.norm_cfg))
        self.stages = nn.ModuleList(
            VanillaBlock(self.dims[i], self.dims[i + 1], self.strides[i], self.act_num, self.norm_cfg,
                         deploy=self.deploy, adaptive_pool=i in self.ada_pool)
            for i in range(self.num_blocks))

    # ---- description of the outputs -------------------------------------------------------------

    def _check_out_indices(self, out_indices):
        if out_indices is None:
            return (self.num_blocks - 1,)
        indices = (out_indices,) if isinstance(out_indices, int) else tuple(out_indices)
        valid = all(isinstance(i, int) and 0 <= i < self.num_blocks for i in indices)
        ordered = all(a < b for a, b in zip(indices, indices[1:]))
        if not indices or not valid or not ordered:
            raise ValueError(f'out_indices must be strictly increasing block indices in [0, {self.num_blocks - 1}] '
                             f'for this arch ({self.num_blocks} blocks), got {out_indices!r}.')
        return indices

    @property
    def block_strides(self):
        """Cumulative stride of every block's output (nominal for ada-pool blocks: ceil(h/2))."""
        strides, total = [], self.stem_stride
        for stride in self.strides:
            total *= stride
            strides.append(total)
        return strides

    @property
    def feature_info(self):
        """One dict per output: ``num_chs`` (channels), ``reduction`` (stride), ``index``, ``module``."""
        strides = self.block_strides
        return [dict(num_chs=self.dims[i + 1], reduction=strides[i], index=i, module=f'stages.{i}')
                for i in self.out_indices]

    @property
    def out_channels(self):
        return [info['num_chs'] for info in self.feature_info]

    @property
    def out_strides(self):
        return [info['reduction'] for info in self.feature_info]

    @property
    def min_input_size(self):
        """Smallest height/width that leaves every output at least 1x1."""
        return self.block_strides[-1]

    # ---- deep training --------------------------------------------------------------------------

    @property
    def act_learn(self):
        """Slope of the leaky ReLU between the two convs of the stem and of every block.

        0 is a ReLU (start of deep training), 1 the identity (the published, fusable state).
        """
        return self._act_learn

    @act_learn.setter
    def act_learn(self, value):
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f'act_learn must lie in [0, 1] (0 = ReLU, 1 = identity), got {value}.')
        if self.deploy and value != 1.0:
            raise ValueError('A deploy-structure VanillaNet has no act_learn below 1: its convs are fused.')
        self._act_learn = value
        for block in self.stages:
            block.act_learn = value

    # ---- forward --------------------------------------------------------------------------------

    def _stem(self, x):
        if self.deploy:
            return self.stem(x)
        x = self.stem1(x)
        if self._act_learn != 1:
            x = F.leaky_relu(x, self._act_learn)
        return self.stem2(x)

    def _run_block(self, block, x):
        if self.with_cp and self.training and x.requires_grad:
            return checkpoint(block, x, use_reentrant=False,
                              context_fn=lambda: (nullcontext(), _bn_statistics_restored(block)))
        return block(x)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'VanillaNet expects images of shape (N, {self.in_channels}, H, W), got '
                             f'{tuple(x.shape)}; convert 1- or 4-channel images to {self.in_channels} channels '
                             f'in the data pipeline or set in_channels.')
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f'Input {tuple(x.shape[-2:])} is too small for this VanillaNet: height and width '
                             f'must be at least {self.min_input_size} pixels.')
        execution = choose_execution(self, x)
        if execution is Execution.ONEDNN_FP32:
            return onednn_inference.fused_forward(self, x, torch.float32)
        if execution is Execution.ONEDNN_BF16:
            return onednn_inference.fused_forward(self, x, torch.bfloat16, self.channels_last_outputs)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self._stem(x)
        outs = []
        for i, block in enumerate(self.stages):
            x = self._run_block(block, x)
            if i in self.out_indices:
                outs.append(x.contiguous())
        return tuple(outs)

    # ---- deploy ---------------------------------------------------------------------------------

    @torch.no_grad()
    def switch_to_deploy(self):
        """Fuse in place into the deploy structure (BN folded, the two 1x1 convs merged).

        Outputs equal the training structure's in eval mode. Requires ``act_learn == 1``.
        """
        if self.deploy:
            return
        if self._act_learn != 1.0:
            raise RuntimeError(f'Cannot fuse VanillaNet with act_learn={self._act_learn}: the leaky ReLU between '
                               'the convs is only the identity at act_learn=1. Finish the deep-training '
                               'schedule (ActLearnHook) or set backbone.act_learn = 1 first.')
        weight, bias = _merge_with_1x1(*_fused_conv_bn(self.stem1), *_fold_bn(
            self.stem2[0].weight, self.stem2[0].bias, self.stem2[1]))
        first = self.stem1[0]
        stem_conv = _new_conv(first.in_channels, self.dims[0], STEM_KERNEL, first.stride, first.padding,
                              weight, bias)
        activation = self.stem2[2]
        activation.switch_to_deploy()
        self.stem = nn.Sequential(stem_conv, activation)
        del self.stem1, self.stem2
        for block in self.stages:
            block.switch_to_deploy()
        self.deploy = True
        self._freeze_stages()

    # ---- loading --------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Every load into this backbone, mmengine's non-strict load_from and resume included, fits exactly
        # or fails with the cause in words: a misfit of the backbone's own keys is never skipped with a
        # warning. A published checkpoint's classifier (cls1.*, cls2.*, cls.*) is no misfit: it is dropped
        # and logged, so that load_state_dict(checkpoint['model_ema'], strict=False) works as in the
        # reference code, and strict=True as well.
        classifier = [k for k in state_dict if k.startswith(prefix) and CLASSIFIER_KEY.match(k[len(prefix):])]
        for key in classifier:
            del state_dict[key]  # load_state_dict works on a copy: the caller's dict keeps them
        if classifier:
            print_log(f'VanillaNet: dropped the classifier of the loaded state dict ({len(classifier)} tensors: '
                      f'{", ".join(classifier[:3])}{", ..." if len(classifier) > 3 else ""}); the backbone has '
                      'no classifier.', logger='current')
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if own:
            check_backbone_state_dict(self, own, source=f'a state dict ({prefix or "no prefix"}*)')
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- training behaviour ---------------------------------------------------------------------

    def _frozen_modules(self):
        if self.frozen_stages < 0:
            return []
        stem = [self.stem] if self.deploy else [self.stem1, self.stem2]
        return stem + list(self.stages[:self.frozen_stages])

    def _freeze_stages(self):
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode=True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def init_weights(self):
        """Initialise from scratch (paper's init), or as ``init_cfg`` says.

        A ``dict(type='Pretrained', checkpoint=PATH)`` entry (optional ``prefix``, ``map_location``,
        ``key``, ``allow_partial``) loads through
        :func:`mmdet_vanillanet.checkpoint.pretrained.load_pretrained_backbone`: safe loader, published formats,
        a strict load that explains any misfit, instead of mmengine's non-strict ``PretrainedInit``.
        """
        pretrained, others = split_pretrained_init_cfg(self.init_cfg)
        check_pretrained_init_cfg(self.init_cfg)
        if pretrained is None:
            if self.init_cfg is None:
                self._init_from_scratch()
            else:
                super().init_weights()
            return
        # Initialise first so that whatever a deliberate partial load skips is still initialised.
        if others:
            initialize(self, others)
        else:
            self._init_from_scratch()
        load_pretrained_backbone(self, **pretrained)
        self._is_init = True

    def _init_from_scratch(self):
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, SeriesActivation)):
                trunc_normal_init(module, std=0.02, bias=0)
            elif isinstance(module, _BatchNorm):
                constant_init(module, 1, bias=0)
