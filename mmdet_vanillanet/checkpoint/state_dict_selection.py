"""The backbone's weights out of a loaded checkpoint: which state dict, without DDP/detector prefixes and classifier."""
import re
from collections.abc import Mapping

import torch

from .weights_error import VanillaNetWeightsError, first_keys

# Where a classification checkpoint keeps its state dicts, in order of preference.
STATE_DICT_KEYS = ('model_ema', 'model', 'state_dict')
CLASSIFIER_KEY = re.compile(r'cls\d*\.')


def select_state_dict(checkpoint, key=None):
    """Pick the state dict out of a checkpoint.

    Args:
        checkpoint (Mapping): the loaded file.
        key (str | None): take ``checkpoint[key]``. None: the first of ``model_ema``, ``model``,
            ``state_dict`` present, else the checkpoint itself when it is a bare state dict.

    Returns:
        tuple[dict, str]: the state dict and which one it is (e.g. ``'model_ema'``, ``'bare state dict'``).
    """
    if not isinstance(checkpoint, Mapping):
        raise VanillaNetWeightsError(f'The checkpoint holds a {type(checkpoint).__name__}, not a dict of weights.')
    candidates = [name for name, value in checkpoint.items() if isinstance(value, Mapping)]
    if key is not None:
        if key not in candidates:
            raise VanillaNetWeightsError(f'The checkpoint has no state dict under {key!r}; it has '
                                         f'{candidates or "none"} (top-level keys: {first_keys(checkpoint)}).')
        return dict(checkpoint[key]), key
    for name in STATE_DICT_KEYS:
        if name in candidates:
            return dict(checkpoint[name]), name
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return dict(checkpoint), 'bare state dict'
    raise VanillaNetWeightsError(f'The checkpoint holds none of {", ".join(STATE_DICT_KEYS)} and is not a bare '
                                 f'state dict (top-level keys: {first_keys(checkpoint)}); name the state dict with '
                                 f'key=... (dicts in it: {candidates or "none"}).')


def strip_module_prefix(state_dict):
    """Remove the ``module.`` prefix DDP adds to every key. Returns (state dict, whether any was removed).

    Args:
        state_dict (Mapping[str, Tensor]): weights.
    """
    stripped = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    return stripped, any(k.startswith('module.') for k in state_dict)


def filter_state_dict(state_dict, prefix=None):
    """Strip ``module.``, keep only the backbone's keys, drop the classifier.

    Args:
        state_dict (Mapping[str, Tensor]): weights as picked by :func:`select_state_dict`.
        prefix (str | None): keep only keys under this prefix and strip it (mmengine's ``prefix``).
            None: ``backbone.`` when any key has it (a detector checkpoint), else no prefix.

    Returns:
        tuple[dict, list[str]]: the backbone state dict and notes on what was done.
    """
    state_dict, had_module = strip_module_prefix(state_dict)
    notes = ["'module.' stripped"] if had_module else []
    if prefix is None and any(k.startswith('backbone.') for k in state_dict):
        prefix = 'backbone.'
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        kept = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not kept:
            raise VanillaNetWeightsError(f'No key of the checkpoint starts with {prefix!r} '
                                         f'(first keys: {first_keys(state_dict)}).')
        notes.append(f"kept {prefix}* ({len(kept)} of {len(state_dict)} tensors)")
        state_dict = kept
    classifier = [k for k in state_dict if CLASSIFIER_KEY.match(k)]
    if classifier:
        notes.append(f'classifier dropped ({len(classifier)} tensors)')
    return {k: v for k, v in state_dict.items() if k not in classifier}, notes
