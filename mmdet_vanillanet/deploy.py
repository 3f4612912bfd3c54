"""Deploy a trained detector: fuse its VanillaNet backbone(s), write a checkpoint and a ``deploy=True`` config.

Flow: config + trained checkpoint -> build the detector (the backbone's ImageNet ``init_cfg`` is not
needed: every weight comes from the checkpoint) -> load strictly through the safe loader -> outputs on
fixed random inputs -> ``switch_to_deploy()`` on every VanillaNet -> outputs again -> compare -> write
``<name>_deploy.pth`` and ``<name>_deploy.py``, a short config that inherits the source config and sets
``deploy=True`` (as mmpretrain's RepVGG deploy configs do).
"""
import copy
import os
import os.path as osp
from collections.abc import Mapping

import torch
from mmengine.config import Config

from .checkpoint.safe_load import read_checkpoint
from .checkpoint.state_dict_selection import select_state_dict, strip_module_prefix
from .checkpoint.weights_description import count_parameters
from .detectors import (
    build_detector,
    check_detector_state_dict,
    find_vanillanets,
    fuse_vanillanets,
    is_vanillanet_cfg,
    vanillanet_cfgs,
)
from .engine.act_learn_hook import META_KEY as ACT_LEARN_META_KEY
from .output_comparison import DeviationMessages, check_deviation, detector_outputs, random_batch

# Checkpoint meta entries carried over to the deploy checkpoint (plain data only).
KEPT_META = ('dataset_meta', 'epoch', 'iter', 'experiment_name', 'mmengine_version', 'seed')
# what a deploy config changes on every VanillaNet of the source config
DEPLOY_OVERRIDES = dict(deploy=True, init_cfg=None)
FUSION_CHECK_MESSAGES = DeviationMessages(
    non_finite='{error} Nothing was written.',
    other_outputs='The fused detector returns other outputs: {error}',
    too_far='The fused detector deviates from the original by {max_abs:.3g} ({max_rel:.3g} relative), more than '
            'the tolerance {tolerance:g}; nothing was written.')


class DeployCheckError(RuntimeError):
    """The fused detector's outputs differ from the original's more than the tolerance allows."""


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
        node.update(DEPLOY_OVERRIDES)
    return cfg


def _vanillanet_overrides(node):
    """The nested dict that sets the deploy overrides on every VanillaNet under ``node`` (a config dict),
    or None when one of them sits inside a list."""
    if is_vanillanet_cfg(node):
        return dict(DEPLOY_OVERRIDES)
    overrides = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            below = _vanillanet_overrides(value)
            if below is None:
                return None
            if below:
                overrides[key] = below
        elif isinstance(value, (list, tuple)) and any(True for _ in vanillanet_cfgs(value)):
            return None
    return overrides


def write_deploy_config(config, cfg, path, checkpoint):
    """Write the fused detector's config to ``path``: the source config as ``_base_``, plus ``deploy=True``.

    Where a VanillaNet sits inside a list (which inheritance can only replace whole), the whole config with
    the overrides is written instead.

    Args:
        config (str): the source config file (the ``_base_``, by a path relative to ``path``).
        cfg (mmengine.Config): the source config as loaded.
        path (str): the config file to write.
        checkpoint (str): the fused checkpoint (``load_from``).
    """
    overrides = _vanillanet_overrides(cfg.model)
    if overrides is None:
        full = deploy_config(cfg)
        full.load_from = checkpoint
        full.dump(path)
        return path
    base = osp.relpath(osp.abspath(config), osp.dirname(osp.abspath(path)))
    lines = [f'# The fused (deploy) form of {osp.basename(config)}, written by tools/deploy.py.',
             f'_base_ = {base!r}', f'model = {overrides!r}', f'load_from = {checkpoint!r}', '']
    with open(path, 'w') as f:
        f.write('\n'.join(lines))
    return path


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
    check_detector_state_dict(model, state_dict, source=f'{path} ({picked})')
    model.load_state_dict(state_dict, strict=True)
    meta = checkpoint.get('meta') or {}
    if meta.get(ACT_LEARN_META_KEY) is not None:
        for net in find_vanillanets(model):
            net.act_learn = meta[ACT_LEARN_META_KEY]
    return meta


def deploy_detector(config, checkpoint, out_dir, shape=(320, 320), num_images=2, seed=0, tolerance=1e-3):
    """Fuse a trained detector's VanillaNet backbone and write ``<name>_deploy.pth`` / ``<name>_deploy.py``.

    Args:
        config (str): the detector's config file.
        checkpoint (str): its trained checkpoint.
        out_dir (str): where to write (created if needed).
        shape (tuple[int, int]): height and width of the random check images. Default: (320, 320).
        num_images (int): number of random check images. Default: 2.
        seed (int): seed of the random images. Default: 0.
        tolerance (float): largest allowed deviation
            (:func:`~mmdet_vanillanet.output_comparison.relative_deviation`). Default: 1e-3.

    Returns:
        dict: ``config`` and ``checkpoint`` (written paths), ``fused`` (module names), ``max_abs``,
        ``max_rel``, ``num_tensors``, ``params_before``, ``params_after``, ``input_shape``.
    """
    cfg = Config.fromfile(config)
    model = build_detector(cfg.model)
    meta = load_detector_checkpoint(model, checkpoint)
    params_before = count_parameters(model.state_dict())
    inputs, data_samples = random_batch(model, shape, num_images, seed)
    before, proposals = detector_outputs(model, inputs, data_samples)
    fused = fuse_vanillanets(model)
    after, _ = detector_outputs(model, inputs, data_samples, proposals)
    result = check_deviation(before, after, tolerance, ('the detector before fusing', 'the fused detector'),
                             DeployCheckError, FUSION_CHECK_MESSAGES)
    name = osp.splitext(osp.basename(config))[0]
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = osp.join(out_dir, f'{name}_deploy.pth')
    cfg_path = write_deploy_config(config, cfg, osp.join(out_dir, f'{name}_deploy.py'), ckpt_path)
    new_meta = {k: meta[k] for k in KEPT_META if k in meta}
    if 'dataset_meta' not in new_meta and meta.get('CLASSES'):  # an mmdet 2.x checkpoint
        new_meta['dataset_meta'] = dict(classes=tuple(meta['CLASSES']))
    new_meta.update({ACT_LEARN_META_KEY: 1.0, 'deployed_from': osp.abspath(checkpoint),
                     'cfg': deploy_config(cfg).pretty_text})
    torch.save(dict(meta=new_meta, state_dict=model.state_dict()), ckpt_path)
    return dict(result, config=cfg_path, checkpoint=ckpt_path, fused=fused, params_before=params_before,
                params_after=count_parameters(model.state_dict()), input_shape=tuple(inputs.shape))
