"""What a state dict says about the VanillaNet that made it, and why it does (not) fit a model.

Reads key layouts only (the published training and deploy structures, the classifier, the ``module.`` and
``backbone.`` prefixes) and explains misfits in words ("checkpoint has 7x7 activation kernels (act_num=3),
the model has act_num=4"). It knows the arch table, not the network and not files: the backbone imports it
to check every load, :mod:`.pretrained` to read published files.
"""
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..arch import ARCH_SETTINGS

# Where a classification checkpoint keeps its state dicts, in order of preference.
STATE_DICT_KEYS = ('model_ema', 'model', 'state_dict')
CLASSIFIER_KEY = re.compile(r'cls\d*\.')
BLOCK_KEY = re.compile(r'stages\.(\d+)\.')
BUFFER_SUFFIXES = ('running_mean', 'running_var', 'num_batches_tracked')
SHOWN_KEYS = 5

# structure -> (stem conv key, stem activation key, output conv key of block i)
STRUCTURE_KEYS = {
    'training': ('stem1.0.weight', 'stem2.2.weight', 'stages.{}.conv2.0.weight'),
    'deploy': ('stem.0.weight', 'stem.1.weight', 'stages.{}.conv.weight'),
}


class VanillaNetWeightsError(ValueError):
    """A checkpoint does not fit a VanillaNet; the message names the likely cause and the fix."""


@dataclass
class WeightsInfo:
    """What the keys and shapes of a state dict say about the VanillaNet that made it.

    Strides (and so the ada-pool variant) are not stored in weights and cannot be told apart.

    Args:
        structure (str | None): ``'training'``, ``'deploy'``, or None when no VanillaNet stem is present.
        dims (list[int | None]): widths C0 ... Cn; None for a block whose output conv is absent.
        act_num (int | None): n of the (2n+1)x(2n+1) activation kernels.
        in_channels (int | None): input channels of the stem conv.
    """

    structure: Optional[str]
    dims: List[Optional[int]]
    act_num: Optional[int]
    in_channels: Optional[int]

    @property
    def num_blocks(self):
        return max(len(self.dims) - 1, 0)

    @property
    def arch(self):
        """The published arch name(s) with these widths, or None."""
        return arch_name(self.dims)


def arch_name(dims):
    """Name(s) of the published archs whose widths are ``dims`` (``'a or b'`` when several), or None.

    Args:
        dims (Sequence[int]): widths C0 ... Cn.
    """
    names = [name for name, settings in ARCH_SETTINGS.items() if settings['dims'] == list(dims)]
    return ' or '.join(names) or None


def describe_state_dict(state_dict):
    """Describe a (prefix-free) VanillaNet state dict from its keys and shapes.

    Args:
        state_dict (Mapping[str, Tensor]): backbone weights in the published key layout.

    Returns:
        WeightsInfo
    """
    for structure, (stem_key, act_key, out_key) in STRUCTURE_KEYS.items():
        if stem_key in state_dict:
            break
    else:
        return WeightsInfo(None, [], None, None)
    stem = state_dict[stem_key]
    blocks = {int(match.group(1)) for match in map(BLOCK_KEY.match, state_dict) if match}
    dims = [int(stem.shape[0])]
    for i in range(max(blocks, default=-1) + 1):
        out = state_dict.get(out_key.format(i), state_dict.get(f'stages.{i}.act.weight'))
        dims.append(None if out is None else int(out.shape[0]))
    kernel = state_dict.get(act_key, state_dict.get('stages.0.act.weight'))
    act_num = None if kernel is None else (int(kernel.shape[-1]) - 1) // 2
    return WeightsInfo(structure, dims, act_num, int(stem.shape[1]))


def describe_model(backbone):
    """The :class:`WeightsInfo` a VanillaNet's own weights would give.

    Args:
        backbone (VanillaNet): the model.
    """
    return WeightsInfo('deploy' if backbone.deploy else 'training', list(backbone.dims), backbone.act_num,
                       backbone.in_channels)


def count_parameters(state_dict):
    """Number of parameter elements in a state dict (BN running statistics not counted).

    Args:
        state_dict (Mapping[str, Tensor]): weights.
    """
    return sum(v.numel() for k, v in state_dict.items() if not k.endswith(BUFFER_SUFFIXES))


# ---- picking the backbone's keys ---------------------------------------------------------------


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


# ---- comparing ----------------------------------------------------------------------------------


def first_keys(keys, n=SHOWN_KEYS):
    """The first ``n`` of ``keys`` as one string, with the total when there are more (for messages)."""
    keys = list(keys)
    shown = ', '.join(map(str, keys[:n]))
    return shown + (f', ... ({len(keys)} in all)' if len(keys) > n else '') if keys else 'none'


def weights_label(info, name=None):
    """How messages name weights: ``name``, else the published arch name, else the widths."""
    return name or info.arch or 'dims ' + ', '.join(map(str, info.dims))


def _kernel(act_num):
    size = 2 * act_num + 1
    return f'{size}x{size}'


def mismatch_causes(found, model, model_name=None):
    """The likely causes, in words, of a checkpoint not fitting a model.

    Args:
        found (WeightsInfo): the checkpoint's description.
        model (WeightsInfo): the model's description.
        model_name (str | None): the model's arch name, if it has one.

    Returns:
        list[str]: empty when the descriptions agree.
    """
    if found.structure is None:
        return ['the checkpoint holds no VanillaNet weights (neither stem1.0.weight nor stem.0.weight)']
    causes = []
    if found.structure != model.structure:
        if found.structure == 'deploy':
            causes.append('this is a deploy-structure checkpoint; set deploy=True')
        else:
            causes.append('this is a training-structure checkpoint and the model has deploy=True; set '
                          'deploy=False (and fuse after loading with switch_to_deploy()), or convert it with '
                          'tools/convert_weights.py --deploy')
    if found.num_blocks != model.num_blocks:
        causes.append(f'checkpoint has {found.num_blocks} blocks ({weights_label(found)}), the model '
                      f'{weights_label(model, model_name)} ({model.num_blocks} blocks)')
    elif found.dims != model.dims:
        causes.append(f'checkpoint widths {found.dims} ({weights_label(found)}) differ from the model\'s {model.dims} '
                      f'({weights_label(model, model_name)})')
    if found.act_num is not None and found.act_num != model.act_num:
        causes.append(f'checkpoint has {_kernel(found.act_num)} activation kernels (act_num={found.act_num}), '
                      f'the model has act_num={model.act_num}')
    if found.in_channels != model.in_channels:
        causes.append(f'checkpoint stem takes {found.in_channels} input channels, the model {model.in_channels}')
    return causes


def _shape(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def key_differences(state_dict, model_state):
    """Missing keys, unexpected keys and shape mismatches of ``state_dict`` against ``model_state``.

    A missing ``num_batches_tracked`` is not counted: it is filled with 0 before loading.

    Args:
        state_dict (Mapping[str, Tensor]): the checkpoint's backbone weights.
        model_state (Mapping[str, Tensor]): the model's ``state_dict()``.

    Returns:
        dict: ``missing`` and ``unexpected`` (lists of keys), ``shapes`` (list of (key, checkpoint shape,
        model shape)).
    """
    return dict(
        missing=[k for k in model_state if k not in state_dict and not k.endswith('num_batches_tracked')],
        unexpected=[k for k in state_dict if k not in model_state],
        shapes=[(k, _shape(v), _shape(model_state[k])) for k, v in state_dict.items()
                if k in model_state and _shape(v) != _shape(model_state[k])])


def difference_lines(diff, limit=SHOWN_KEYS):
    """One line each for the missing keys, unexpected keys and shape mismatches of :func:`key_differences`."""
    lines = []
    for name in ('missing', 'unexpected'):
        if diff[name]:
            lines.append(f'{len(diff[name])} {name} keys: {first_keys(diff[name], limit)}')
    if diff['shapes']:
        shown = [f'{k} {ckpt} vs {mine}' for k, ckpt, mine in diff['shapes']]
        lines.append(f'{len(shown)} shape mismatches (checkpoint vs model): {first_keys(shown, limit)}')
    return lines


def compare_with_model(backbone, state_dict):
    """Compare prefix-free backbone weights with a VanillaNet, without loading anything.

    Args:
        backbone (VanillaNet): the model.
        state_dict (Mapping[str, Tensor]): the weights.

    Returns:
        tuple[WeightsInfo, list[str], dict]: the weights' description, the likely causes of a misfit
        in words (:func:`mismatch_causes`) and the key differences (:func:`key_differences`).
    """
    found = describe_state_dict(state_dict)
    causes = mismatch_causes(found, describe_model(backbone), backbone.arch_name)
    return found, causes, key_differences(state_dict, backbone.state_dict())


def misfit_message(source, causes, diff):
    """The error message of weights from ``source`` that do not fit: the causes, the key lines, the fix."""
    reason = '; '.join(causes) if causes else 'its keys differ from the model\'s'
    return '\n'.join(
        [f'Cannot load VanillaNet weights from {source}: {reason}.'] + difference_lines(diff)
        + ['Use the checkpoint that matches the config or change the config to match it; for a deliberate '
           'partial load set allow_partial=True in init_cfg (every skipped key is then logged).'])


def check_backbone_state_dict(backbone, state_dict, source='state dict'):
    """Raise :class:`VanillaNetWeightsError`, naming the likely cause, unless the weights fit exactly.

    Args:
        backbone (VanillaNet): the model.
        state_dict (Mapping[str, Tensor]): prefix-free backbone weights.
        source (str): where the weights came from, for the message.

    Returns:
        WeightsInfo: the weights' description.
    """
    found, causes, diff = compare_with_model(backbone, state_dict)
    if causes or any(diff.values()):
        raise VanillaNetWeightsError(misfit_message(source, causes, diff))
    return found
