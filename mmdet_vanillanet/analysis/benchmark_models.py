"""The models the benchmark compares, built from configs without any download.

VanillaNet detectors come from this project's configs (training structure, or ``deploy=True`` through
:func:`mmdet_vanillanet.deploy.deploy_config`); the baselines from mmdet's own configs. Every backbone's
``init_cfg`` is dropped (random initialisation: the benchmark measures cost, not accuracy).
"""
import functools
import json
import os.path as osp

import torch
from mmengine.config import Config
from mmengine.hub import get_config

from .. import detectors
from ..deploy import deploy_config
from ..detectors import quiet_mmengine
from ..models import VanillaNet
from ..output_comparison import random_batch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

DETECTORS = ('retinanet', 'mask-rcnn')
DETECTOR_NAMES = {'retinanet': 'RetinaNet', 'mask-rcnn': 'Mask R-CNN'}
VANILLANET_CONFIGS = {
    'retinanet': osp.join(ROOT, 'configs', 'retinanet_vanillanet13_1x.py'),
    'mask-rcnn': osp.join(ROOT, 'configs', 'mask-rcnn_vanillanet13_1x.py'),
}
BASELINES = ('r50', 'swin-t')
BASELINE_NAMES = {'r50': 'ResNet-50', 'swin-t': 'Swin-T'}
BASELINE_CONFIGS = {
    ('retinanet', 'r50'): 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
    ('retinanet', 'swin-t'): 'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py',
    ('mask-rcnn', 'r50'): 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
    ('mask-rcnn', 'swin-t'): 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
}
# VanillaNet paper (Chen et al., NeurIPS 2023), detection table: GFLOPs and parameters (M) of the fused detectors.
PAPER = {
    ('retinanet', 'vanillanet'): dict(gflops=396.9, params_m=75.4),
    ('retinanet', 'swin-t'): dict(gflops=244.8, params_m=38.5),
    ('mask-rcnn', 'vanillanet'): dict(gflops=420.7, params_m=77.1),
    ('mask-rcnn', 'swin-t'): dict(gflops=263.8, params_m=47.8),
}


def parse_arch(arch):
    """A VanillaNet arch from the command line: a name of ``ARCH_SETTINGS`` or a JSON dict."""
    if isinstance(arch, str) and arch.lstrip().startswith('{'):
        return json.loads(arch)
    return arch


@functools.lru_cache(maxsize=None)
def recipe_backbone(detector='retinanet'):
    """``arch``, ``act_num`` and ``out_indices`` of the VanillaNet in this project's recipe config of ``detector``."""
    backbone = Config.fromfile(VANILLANET_CONFIGS[detector]).model.backbone
    return dict(arch=backbone.arch, act_num=backbone.act_num, out_indices=tuple(backbone.out_indices))


def backbone_kwargs(arch=None, act_num=None, out_indices=None):
    """Keyword arguments of the VanillaNet the benchmark measures; None: the RetinaNet recipe's."""
    recipe = recipe_backbone('retinanet')
    return dict(arch=parse_arch(recipe['arch'] if arch is None else arch),
                act_num=recipe['act_num'] if act_num is None else act_num,
                out_indices=tuple(recipe['out_indices'] if out_indices is None else out_indices))


def build_backbone(deploy, arch=None, act_num=None, out_indices=None, device='cpu', **kwargs):
    """A VanillaNet (paper's random init) in eval mode.

    Args:
        deploy (bool): the fused structure.
        arch, act_num, out_indices: as :class:`~mmdet_vanillanet.models.VanillaNet`; None: the RetinaNet
            recipe config's.
        device (str | torch.device): Default: 'cpu'.
        **kwargs: more VanillaNet arguments (``channels_last``, ``fast_inference``, ``with_cp`` ...).
    """
    net = VanillaNet(deploy=deploy, **backbone_kwargs(arch, act_num, out_indices), **kwargs)
    net.init_weights()
    return net.to(device).eval()


@torch.no_grad()
def scale_preserving_init_(model):
    """Re-draw every VanillaNet conv of ``model`` with He-normal weights (std sqrt(2 / fan-in)) and zero biases.

    The paper's init (truncated normal, std 0.02) shrinks the activations of a deep fused VanillaNet towards
    zero (VanillaNet-13's last output near 1e-12): fine for timing fp32, meaningless for reduced precision,
    whose error is relative to the activations' range. This keeps them near unit scale, as trained ones are.

    Args:
        model (nn.Module): a VanillaNet or a detector holding one; changed in place and returned.
    """
    for net in detectors.find_vanillanets(model):
        for module in net.modules():
            weight = getattr(module, 'weight', None)
            if isinstance(weight, torch.nn.Parameter) and weight.dim() == 4:
                weight.normal_(0, (2 / weight[0].numel()) ** 0.5)
                if getattr(module, 'bias', None) is not None:
                    module.bias.zero_()
    return model


def detector_config(detector, backbone='vanillanet', deploy=False, arch=None, act_num=None, with_cp=False):
    """The config of one benchmark detector, with every backbone ``init_cfg`` dropped.

    Args:
        detector (str): 'retinanet' or 'mask-rcnn'.
        backbone (str): 'vanillanet' (this project's configs), 'r50' or 'swin-t' (mmdet's configs).
        deploy (bool): VanillaNet only: the fused structure (``deploy=True``, as ``tools/deploy.py`` writes).
        arch (str | dict | None): VanillaNet only: another arch than the config's (the neck's input
            channels follow). None keeps vanillanet_13.
        act_num (int | None): VanillaNet only: another act_num. None keeps the config's.
        with_cp (bool): VanillaNet only: activation checkpointing.

    Returns:
        mmengine.Config
    """
    if detector not in DETECTORS:
        raise ValueError(f'Unknown detector {detector!r}; choose from {", ".join(DETECTORS)}.')
    if backbone == 'vanillanet':
        cfg = Config.fromfile(VANILLANET_CONFIGS[detector])
        cfg.model.backbone.pop('init_cfg', None)
        if arch is not None:
            cfg.model.backbone.arch = parse_arch(arch)
            with torch.device('meta'):
                probe = VanillaNet(**{k: v for k, v in cfg.model.backbone.items() if k != 'type'})
            cfg.model.neck.in_channels = probe.out_channels
        if act_num is not None:
            cfg.model.backbone.act_num = act_num
        cfg.model.backbone.with_cp = with_cp
        if deploy:
            cfg = deploy_config(cfg)
        return cfg
    if (detector, backbone) not in BASELINE_CONFIGS:
        raise ValueError(f'Unknown baseline backbone {backbone!r}; choose from {", ".join(BASELINES)}.')
    if deploy or arch is not None or act_num is not None or with_cp:
        raise ValueError('deploy, arch, act_num and with_cp apply to VanillaNet detectors only.')
    cfg = get_config(BASELINE_CONFIGS[(detector, backbone)], pretrained=False)
    cfg.model.backbone.init_cfg = None
    return cfg


def build_detector(cfg, device='cpu', init=True):
    """Build a config's detector in eval mode (random weights: no pretrained checkpoint is read).

    Args:
        cfg (mmengine.Config): from :func:`detector_config`.
        device (str | torch.device): Default: 'cpu'.
        init (bool): run ``init_weights`` (the configs' random initialisation). Default: True.
    """
    with quiet_mmengine():
        model = detectors.build_detector(cfg.model, init_weights=init)
    return model.to(device).eval()


def detector_inputs(model, shape, batch=1, device='cpu', seed=0):
    """Fixed random, already-normalised images of ``shape`` (rounded up to the padding divisor) and metainfo."""
    inputs, data_samples = random_batch(model, tuple(shape), batch, seed)
    return inputs.to(device), data_samples
