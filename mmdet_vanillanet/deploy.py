"""Deploy a trained detector: fuse its VanillaNet backbone(s), write a checkpoint and a ``deploy=True`` config.

Flow: config + trained checkpoint -> build the detector (the backbone's ImageNet ``init_cfg`` is not
needed: every weight comes from the checkpoint) -> load strictly through the safe loader -> outputs on
fixed random inputs -> ``switch_to_deploy()`` on every VanillaNet -> outputs again -> compare -> write
``<name>_deploy.pth`` and ``<name>_deploy.py``.
"""
import copy
import os
import os.path as osp
from collections.abc import Mapping

import torch
from mmengine.config import Config
from mmengine.model import is_model_wrapper

from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules

from .checkpoint.safe_load import read_checkpoint
from .checkpoint.weights import (VanillaNetWeightsError, check_backbone_state_dict, count_parameters,
                                 select_state_dict, strip_module_prefix)
from .engine.act_learn_hook import META_KEY as ACT_LEARN_META_KEY
from .engine.act_learn_hook import find_vanillanets
from .models.vanillanet import VanillaNet

# Checkpoint meta entries carried over to the deploy checkpoint (plain data only).
KEPT_META = ('dataset_meta', 'epoch', 'iter', 'experiment_name', 'mmengine_version', 'seed')


class DeployCheckError(RuntimeError):
    """The fused detector's outputs differ from the original's more than the tolerance allows."""


def vanillanet_cfgs(node):
    """Every VanillaNet config dict inside a (nested) model config."""
    if isinstance(node, Mapping):
        kind = node.get('type')
        if kind is VanillaNet or (isinstance(kind, str) and kind.split('.')[-1] == 'VanillaNet'):
            yield node
        for value in node.values():
            yield from vanillanet_cfgs(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from vanillanet_cfgs(value)


def deploy_config(cfg):
    """The config of the fused detector: ``deploy=True`` and no ``init_cfg`` on every VanillaNet.

    Args:
        cfg (mmengine.Config): the training config.

    Returns:
        mmengine.Config: a modified copy (everything else, ``custom_imports`` included, kept).
    """
    cfg = copy.deepcopy(cfg)
    nodes = list(vanillanet_cfgs(cfg.model))
    if not nodes:
        raise ValueError('The config builds no VanillaNet (no type="VanillaNet" under model); nothing to fuse.')
    for node in nodes:
        node['deploy'] = True
        node.pop('init_cfg', None)
    return cfg


def build_detector(cfg):
    """Build the model of a config without its backbone's pretrained ``init_cfg`` (weights come later).

    Args:
        cfg (mmengine.Config): a full detector config (``custom_imports`` are imported by ``Config.fromfile``).
    """
    register_all_modules(init_default_scope=True)
    model_cfg = copy.deepcopy(cfg.model)
    for node in vanillanet_cfgs(model_cfg):
        node.pop('init_cfg', None)
    return MODELS.build(model_cfg)


def load_detector_checkpoint(model, path):
    """Load a detector checkpoint strictly (safe loader); explain a misfit of the backbone in words.

    Also restores the ``act_learn`` that :class:`~mmdet_vanillanet.engine.ActLearnHook` stored in the
    checkpoint meta, so that a checkpoint saved mid deep-training refuses to fuse.

    Args:
        model (nn.Module): the detector.
        path (str): checkpoint file or URL (mmengine ``{'state_dict': ..., 'meta': ...}`` or a bare state dict).

    Returns:
        dict: the checkpoint's ``meta`` (empty when absent).
    """
    checkpoint = read_checkpoint(path)
    has_state_dict = isinstance(checkpoint, Mapping) and 'state_dict' in checkpoint
    state_dict, picked = select_state_dict(checkpoint, 'state_dict' if has_state_dict else None)
    state_dict, _ = strip_module_prefix(state_dict)
    for name, module in model.named_modules():
        if isinstance(module, VanillaNet):
            prefix = name + '.'
            part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            check_backbone_state_dict(module, part, source=f'{path} ({picked}, {prefix}*)')
    model_keys = set(model.state_dict())
    missing = sorted(model_keys - set(state_dict))
    unexpected = sorted(set(state_dict) - model_keys)
    if missing or unexpected:
        raise VanillaNetWeightsError(
            f'{path} does not fit the detector of the config: {len(missing)} missing keys '
            f'({", ".join(missing[:5])}), {len(unexpected)} unexpected keys ({", ".join(unexpected[:5])}). '
            'Is it a checkpoint of this config?')
    model.load_state_dict(state_dict, strict=True)
    meta = checkpoint.get('meta') or {}
    if meta.get(ACT_LEARN_META_KEY) is not None:
        for net in find_vanillanets(model):
            net.act_learn = meta[ACT_LEARN_META_KEY]
    return meta


def fuse_vanillanets(model):
    """Fuse every VanillaNet inside ``model`` in place (``switch_to_deploy``). Returns their names.

    Args:
        model (nn.Module): a detector (a DDP / model wrapper is unwrapped).
    """
    if is_model_wrapper(model):
        model = model.module
    names = [name for name, module in model.named_modules() if isinstance(module, VanillaNet)]
    for name in names:
        model.get_submodule(name).switch_to_deploy()
    return names


def random_batch(model, shape=(320, 320), num_images=2, seed=0):
    """Fixed random (already normalised) images and matching data samples for ``mode='tensor'``.

    Args:
        model (nn.Module): the detector (its ``data_preprocessor`` gives the padding divisor).
        shape (tuple[int, int]): image height and width, rounded up to the padding divisor.
        num_images (int): batch size.
        seed (int): random seed.
    """
    divisor = getattr(model.data_preprocessor, 'pad_size_divisor', 1) or 1
    height, width = (-(-side // divisor) * divisor for side in shape)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_images, 3, height, width, generator=generator)
    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                batch_input_shape=(height, width), scale_factor=(1.0, 1.0))
    return inputs, [DetDataSample(metainfo=meta) for _ in range(num_images)]


def _tensors(outputs):
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        outputs = list(outputs.values())
    if isinstance(outputs, (list, tuple)):
        return [t for item in outputs for t in _tensors(item)]
    return []


@torch.no_grad()
def detector_outputs(model, inputs, data_samples, proposals=None):
    """What the detector computes, as a flat list of tensors; two-stage detectors at fixed proposals.

    Single-stage detectors: the raw outputs of ``mode='tensor'`` (``_forward``). Two-stage detectors
    (with a ``roi_head``): the neck's features, the RPN head's raw outputs and the RoI head's outputs for
    ``proposals``. Comparing RoI outputs at proposals that each model chose itself would compare different
    boxes wherever the RPN's top-k choice flips between nearly equal scores.

    Args:
        model (nn.Module): the detector, in eval mode.
        inputs (Tensor): a batch of images.
        data_samples (list[DetDataSample]): their metainfo.
        proposals (list[InstanceData] | None): the proposals at which a two-stage detector's RoI head is
            evaluated; None: the RPN's own (return them to compare another model at the same boxes).

    Returns:
        tuple[list[Tensor], list[InstanceData] | None]: the outputs, and the proposals used.
    """
    if not hasattr(model, 'roi_head'):
        return [t.detach().clone() for t in _tensors(model(inputs, data_samples, mode='tensor'))], None
    features = model.extract_feat(inputs)
    if proposals is None:
        proposals = model.rpn_head.predict(features, data_samples, rescale=False)
    outputs = [features, model.rpn_head(features), model.roi_head.forward(features, proposals, data_samples)]
    return [t.detach().clone() for t in _tensors(outputs)], proposals


def compare_outputs(before, after):
    """Largest absolute deviation, and that deviation relative to the largest reference value.

    Args:
        before (list[Tensor]): reference outputs.
        after (list[Tensor]): outputs to check, same shapes.

    Returns:
        dict: ``max_abs``, ``max_rel``, ``num_tensors``.
    """
    shapes = [tuple(t.shape) for t in before], [tuple(t.shape) for t in after]
    if shapes[0] != shapes[1]:
        raise DeployCheckError(f'The fused detector returns outputs of other shapes: {shapes[1]} vs {shapes[0]}.')
    max_abs = max((float((a - b).abs().max()) for a, b in zip(after, before) if a.numel()), default=0.0)
    scale = max((float(b.abs().max()) for b in before if b.numel()), default=0.0)
    return dict(max_abs=max_abs, max_rel=max_abs / scale if scale else max_abs, num_tensors=len(before))


def deploy_detector(config, checkpoint, out_dir, shape=(320, 320), num_images=2, seed=0, tolerance=1e-3):
    """Fuse a trained detector's VanillaNet backbone and write ``<name>_deploy.pth`` / ``<name>_deploy.py``.

    Args:
        config (str): the detector's config file.
        checkpoint (str): its trained checkpoint.
        out_dir (str): where to write (created if needed).
        shape (tuple[int, int]): height and width of the random check images. Default: (320, 320).
        num_images (int): number of random check images. Default: 2.
        seed (int): seed of the random images. Default: 0.
        tolerance (float): largest allowed deviation, relative to the largest output value. Default: 1e-3.

    Returns:
        dict: ``config`` and ``checkpoint`` (written paths), ``fused`` (module names), ``max_abs``,
        ``max_rel``, ``num_tensors``, ``params_before``, ``params_after``, ``input_shape``.
    """
    cfg = Config.fromfile(config)
    model = build_detector(cfg)
    meta = load_detector_checkpoint(model, checkpoint)
    model.eval()
    params_before = count_parameters(model.state_dict())
    inputs, data_samples = random_batch(model, shape, num_images, seed)
    before, proposals = detector_outputs(model, inputs, data_samples)
    fused = fuse_vanillanets(model)
    after, _ = detector_outputs(model, inputs, data_samples, proposals)
    result = compare_outputs(before, after)
    if result['max_rel'] > tolerance:
        raise DeployCheckError(f'The fused detector deviates from the original by {result["max_abs"]:.3g} '
                               f'({result["max_rel"]:.3g} of the largest output), more than the tolerance '
                               f'{tolerance:g}; nothing was written.')
    name = osp.splitext(osp.basename(config))[0]
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = osp.join(out_dir, f'{name}_deploy.pth')
    cfg_path = osp.join(out_dir, f'{name}_deploy.py')
    new_cfg = deploy_config(cfg)
    new_cfg.load_from = ckpt_path
    new_cfg.dump(cfg_path)
    new_meta = {k: meta[k] for k in KEPT_META if k in meta}
    if 'dataset_meta' not in new_meta and meta.get('CLASSES'):  # an mmdet 2.x checkpoint
        new_meta['dataset_meta'] = dict(classes=tuple(meta['CLASSES']))
    new_meta.update({ACT_LEARN_META_KEY: 1.0, 'deployed_from': osp.abspath(checkpoint),
                     'cfg': new_cfg.pretty_text})
    torch.save(dict(meta=new_meta, state_dict=model.state_dict()), ckpt_path)
    return dict(result, config=cfg_path, checkpoint=ckpt_path, fused=fused, params_before=params_before,
                params_after=count_parameters(model.state_dict()), input_shape=tuple(inputs.shape))
