"""Detectors that hold VanillaNets: find them in configs and models, build without pretrained weights, fuse.

- :func:`vanillanet_cfgs` / :func:`find_vanillanets`: every VanillaNet in a model config / a built model;
- :func:`check_detector_state_dict`: whether weights fit a detector exactly, misfits in words;
- :func:`build_detector`: a config's detector without reading its backbone's pretrained weights;
- :func:`fuse_vanillanets`: ``switch_to_deploy()`` on every VanillaNet of a detector;
- :func:`quiet_mmengine`: build and initialise without mmengine's per-parameter INFO lines.
"""
import copy
import logging
from collections.abc import Mapping
from contextlib import contextmanager

from mmengine.logging import MMLogger
from mmengine.model import is_model_wrapper
from mmengine.registry import DefaultScope

from mmdet.registry import MODELS
from mmdet.utils import register_all_modules

from .checkpoint.weights_error import VanillaNetWeightsError
from .checkpoint.weights_fit import check_backbone_state_dict, difference_lines, key_differences
from .models import VanillaNet


def is_vanillanet_cfg(node):
    """Whether ``node`` is the config dict of a VanillaNet (``type`` the class or its registered name)."""
    if not isinstance(node, Mapping):
        return False
    kind = node.get('type')
    return kind is VanillaNet or (isinstance(kind, str) and kind.split('.')[-1] == 'VanillaNet')


def vanillanet_cfgs(node):
    """Every VanillaNet config dict inside a (nested) model config, in place (changes reach the config).

    Args:
        node (dict | list): e.g. ``cfg.model``.
    """
    if isinstance(node, Mapping):
        if is_vanillanet_cfg(node):
            yield node
        for value in node.values():
            yield from vanillanet_cfgs(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from vanillanet_cfgs(value)


def find_vanillanets(model):
    """Every VanillaNet module inside ``model`` (a DDP / model wrapper is unwrapped), as a list.

    Args:
        model (nn.Module): a detector, a backbone or a wrapper.
    """
    if is_model_wrapper(model):
        model = model.module
    return [module for module in model.modules() if isinstance(module, VanillaNet)]


def check_detector_state_dict(model, state_dict, source='the checkpoint'):
    """Raise :class:`VanillaNetWeightsError` unless ``state_dict`` has exactly the model's keys and shapes.

    Each VanillaNet's own keys are checked first, so that a misfit there is explained in words
    (``act_num``, ``deploy``, widths); then every other key (neck, heads, ...) and shape. A missing
    ``num_batches_tracked`` is no misfit (loading fills it with 0).

    Args:
        model (nn.Module): the detector (a DDP / model wrapper is unwrapped).
        state_dict (Mapping[str, Tensor]): its weights, without the ``module.`` prefix.
        source (str): where the weights come from, for the message. Default: 'the checkpoint'.
    """
    if is_model_wrapper(model):
        model = model.module
    for name, module in model.named_modules():
        if isinstance(module, VanillaNet):
            prefix = f'{name}.' if name else ''
            part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            check_backbone_state_dict(module, part, source=f'{source} ({prefix or "no prefix"}*)')
    differences = key_differences(state_dict, model.state_dict())
    if any(differences.values()):
        raise VanillaNetWeightsError('\n'.join(
            [f'{source} does not fit the detector of the config:'] + difference_lines(differences)
            + ['Is it a checkpoint of this config? (Weights are loaded strictly: every key and shape must match.)']))


@contextmanager
def quiet_mmengine():
    """Silence mmengine's INFO and WARNING messages inside the block (``init_weights`` logs every parameter
    when no log file is open); the logger's level is restored afterwards."""
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_detector(model_cfg, init_weights=False):
    """Build a detector without reading its VanillaNets' ``init_cfg`` weights, in eval mode.

    Builds in mmdet's registry scope and then restores the caller's default scope.

    Args:
        model_cfg (dict): the ``model`` part of a config (left unchanged).
        init_weights (bool): run ``init_weights()`` (the configs' random initialisation; every VanillaNet's
            ``init_cfg`` is dropped first, so no file is read). Default: False (weights come later).
    """
    register_all_modules(init_default_scope=False)
    model_cfg = copy.deepcopy(model_cfg)
    for node in vanillanet_cfgs(model_cfg):
        node.pop('init_cfg', None)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(model_cfg)
        if init_weights:
            model.init_weights()
    return model.eval()


def fuse_vanillanets(model):
    """Fuse every VanillaNet inside ``model`` in place (``switch_to_deploy``). Returns their module names.

    Args:
        model (nn.Module): a detector (a DDP / model wrapper is unwrapped).
    """
    if is_model_wrapper(model):
        model = model.module
    names = [name for name, module in model.named_modules() if isinstance(module, VanillaNet)]
    for name in names:
        model.get_submodule(name).switch_to_deploy()
    return names
