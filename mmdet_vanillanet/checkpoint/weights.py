"""Foreign weights -> a VanillaNet backbone: the one place that maps checkpoints onto the model.

Flow: safe load -> pick ``model_ema`` / ``model`` / ``state_dict`` (or a bare state dict) -> strip the
``module.`` (DDP) and ``backbone.`` (detector) prefixes, drop the classifier -> describe the weights from
their shapes and compare them with the model -> load strictly, or, only when asked, partially with
every skipped key logged -> log one line saying what was loaded.
"""
import logging
import os.path as osp
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import List, Optional

import torch
from mmengine.logging import print_log
from mmengine.model.weight_init import PretrainedInit

from ..models.vanillanet import ARCH_SETTINGS, VanillaNet
from .safe_load import read_checkpoint

# Where a classification checkpoint keeps its state dicts, in order of preference.
STATE_DICT_KEYS = ('model_ema', 'model', 'state_dict')
CLASSIFIER_KEY = re.compile(r'cls\d*\.')
BLOCK_KEY = re.compile(r'stages\.(\d+)\.')
BUFFER_SUFFIXES = ('running_mean', 'running_var', 'num_batches_tracked')
RELEASES_URL = 'https://github.com/huawei-noah/VanillaNet/releases'
DETECTION_CHECKPOINT = 'vanillanet_13_act_num_4_kd_pretrain.pth'
PRETRAINED_KEYS = ('type', 'checkpoint', 'prefix', 'map_location', 'key', 'allow_partial')
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


# ---- reading ------------------------------------------------------------------------------------


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
                                         f'{candidates or "none"} (top-level keys: {_first(checkpoint)}).')
        return dict(checkpoint[key]), key
    for name in STATE_DICT_KEYS:
        if name in candidates:
            return dict(checkpoint[name]), name
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return dict(checkpoint), 'bare state dict'
    raise VanillaNetWeightsError(f'The checkpoint holds none of {", ".join(STATE_DICT_KEYS)} and is not a bare '
                                 f'state dict (top-level keys: {_first(checkpoint)}); name the state dict with '
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
                                         f'(first keys: {_first(state_dict)}).')
        notes.append(f"kept {prefix}* ({len(kept)} of {len(state_dict)} tensors)")
        state_dict = kept
    classifier = [k for k in state_dict if CLASSIFIER_KEY.match(k)]
    if classifier:
        notes.append(f'classifier dropped ({len(classifier)} tensors)')
    return {k: v for k, v in state_dict.items() if k not in classifier}, notes


def read_backbone_weights(path, key=None, prefix=None, map_location='cpu'):
    """Read a checkpoint file and return the VanillaNet backbone weights in it.

    Args:
        path (str): checkpoint file (classification, bare, DDP, detector or converted).
        key (str | None): see :func:`select_state_dict`.
        prefix (str | None): see :func:`filter_state_dict`.
        map_location (str | torch.device): where tensors go. Default: 'cpu'.

    Returns:
        tuple[dict, str]: the state dict, and a description of where it came from, e.g.
        ``"ckpt.pth (model_ema; classifier dropped (5 tensors))"``.
    """
    checkpoint = read_checkpoint(path, map_location)
    state_dict, picked = select_state_dict(checkpoint, key)
    state_dict, notes = filter_state_dict(state_dict, prefix)
    others = [name for name in STATE_DICT_KEYS if name != picked and isinstance(checkpoint.get(name), Mapping)]
    if others:
        notes.insert(0, f'also holds {", ".join(others)}')
    return state_dict, f'{path} ({"; ".join([picked] + notes)})'


# ---- comparing and loading ----------------------------------------------------------------------


def _first(keys, n=SHOWN_KEYS):
    keys = list(keys)
    shown = ', '.join(map(str, keys[:n]))
    return shown + (f', ... ({len(keys)} in all)' if len(keys) > n else '') if keys else 'none'


def _label(info, name=None):
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
        causes.append(f'checkpoint has {found.num_blocks} blocks ({_label(found)}), the model '
                      f'{_label(model, model_name)} ({model.num_blocks} blocks)')
    elif found.dims != model.dims:
        causes.append(f'checkpoint widths {found.dims} ({_label(found)}) differ from the model\'s {model.dims} '
                      f'({_label(model, model_name)})')
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


def _difference_lines(diff, limit=SHOWN_KEYS):
    lines = []
    for name in ('missing', 'unexpected'):
        if diff[name]:
            lines.append(f'{len(diff[name])} {name} keys: {_first(diff[name], limit)}')
    if diff['shapes']:
        shown = [f'{k} {ckpt} vs {mine}' for k, ckpt, mine in diff['shapes']]
        lines.append(f'{len(shown)} shape mismatches (checkpoint vs model): {_first(shown, limit)}')
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


def _misfit_message(source, causes, diff):
    reason = '; '.join(causes) if causes else 'its keys differ from the model\'s'
    return '\n'.join(
        [f'Cannot load VanillaNet weights from {source}: {reason}.'] + _difference_lines(diff)
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
        raise VanillaNetWeightsError(_misfit_message(source, causes, diff))
    return found


def load_backbone_state_dict(backbone, state_dict, source='state dict', allow_partial=False):
    """Load backbone weights strictly after checking that they fit; explain any misfit in words.

    Args:
        backbone (VanillaNet): the model to load into.
        state_dict (Mapping[str, Tensor]): prefix-free backbone weights (see :func:`filter_state_dict`).
        source (str): where the weights came from, for messages.
        allow_partial (bool): load only the tensors that fit (name and shape) and log every skipped key,
            instead of raising. Default: False.

    Returns:
        dict: ``source``, ``arch``, ``act_num``, ``structure``, ``loaded`` (number of tensors) and
        ``skipped`` (keys of the model or the checkpoint left out; empty for a full load).
    """
    state_dict = dict(state_dict)
    model_state = backbone.state_dict()
    found, causes, diff = compare_with_model(backbone, state_dict)
    fits = not (causes or any(diff.values()))
    if not fits and not allow_partial:
        raise VanillaNetWeightsError(_misfit_message(source, causes, diff))
    for k in model_state:
        if k.endswith('num_batches_tracked') and k not in state_dict:
            state_dict[k] = torch.tensor(0)
    skipped, loaded = [], len(model_state)
    if not fits:
        bad_shapes = {k for k, _, _ in diff['shapes']}
        usable = {k: v for k, v in state_dict.items() if k in model_state and k not in bad_shapes}
        if not usable:
            raise VanillaNetWeightsError(f'Nothing in {source} fits this VanillaNet, even as a partial load: '
                                         + ('; '.join(causes) or 'no key in common') + '.')
        print_log(f'Partial load of VanillaNet weights from {source}: ' + ('; '.join(causes) or 'keys differ'),
                  logger='current', level=logging.WARNING)
        for line in _difference_lines(diff, limit=len(model_state) + len(state_dict)):
            print_log(f'  skipped {line}', logger='current', level=logging.WARNING)
        skipped = diff['missing'] + diff['unexpected'] + sorted(bad_shapes)
        state_dict, loaded = {**model_state, **usable}, len(usable)
    backbone.load_state_dict(state_dict, strict=True)
    return dict(source=source, arch=found.arch or _label(found), act_num=found.act_num, structure=found.structure,
                loaded=loaded, skipped=skipped)


def load_pretrained_backbone(backbone, checkpoint, key=None, prefix=None, allow_partial=False,
                             map_location='cpu'):
    """Load published (or converted, or detector) weights into a VanillaNet and log what was loaded.

    Args:
        backbone (VanillaNet): the model to load into.
        checkpoint (str): checkpoint file path (or ``scheme://`` URL, read by mmengine).
        key (str | None): state dict to take; None prefers ``model_ema``, then ``model``, ``state_dict``.
        prefix (str | None): keep only keys under this prefix; None detects ``backbone.``.
        allow_partial (bool): load what fits and log every skipped key instead of raising. Default: False.
        map_location (str | torch.device): where tensors are read to. Default: 'cpu'.

    Returns:
        dict: see :func:`load_backbone_state_dict`.
    """
    state_dict, source = read_backbone_weights(checkpoint, key=key, prefix=prefix, map_location=map_location)
    summary = load_backbone_state_dict(backbone, state_dict, source=source, allow_partial=allow_partial)
    partial = f', {len(summary["skipped"])} keys skipped' if summary['skipped'] else ''
    print_log(f'Loaded VanillaNet weights from {source}: {summary["arch"]}, act_num={summary["act_num"]}, '
              f'{summary["structure"]} structure, {summary["loaded"]} tensors{partial}.', logger='current')
    return summary


# ---- init_cfg -----------------------------------------------------------------------------------


def split_pretrained_init_cfg(init_cfg):
    """Separate a ``Pretrained`` entry from the rest of an mmengine ``init_cfg``, validated.

    Args:
        init_cfg (dict | list[dict] | None): the backbone's init_cfg. The ``Pretrained`` entry takes
            ``checkpoint`` and optionally ``prefix``, ``map_location`` (as mmengine's) and ``key``,
            ``allow_partial`` (see :func:`load_pretrained_backbone`).

    Returns:
        tuple[dict | None, list[dict]]: keyword arguments for :func:`load_pretrained_backbone` (None
        without a ``Pretrained`` entry) and the other entries.
    """
    if not init_cfg:
        return None, []
    cfgs = [init_cfg] if isinstance(init_cfg, Mapping) else list(init_cfg)
    pretrained = [cfg for cfg in cfgs if cfg.get('type') in ('Pretrained', PretrainedInit)]
    others = [cfg for cfg in cfgs if cfg.get('type') not in ('Pretrained', PretrainedInit)]
    if not pretrained:
        return None, others
    if len(pretrained) > 1:
        raise ValueError('VanillaNet init_cfg holds more than one Pretrained entry; keep one.')
    unknown = sorted(set(pretrained[0]) - set(PRETRAINED_KEYS))
    if unknown:
        raise ValueError(f'Unknown keys {unknown} in VanillaNet init_cfg Pretrained entry; allowed: '
                         f'{", ".join(PRETRAINED_KEYS)}.')
    kwargs = {k: v for k, v in pretrained[0].items() if k != 'type'}
    if not kwargs.get('checkpoint'):
        raise ValueError('VanillaNet init_cfg type=Pretrained needs checkpoint=PATH.')
    return kwargs, others


def check_pretrained_init_cfg(init_cfg):
    """Validate a backbone init_cfg; fail now, before any data is read, if its local checkpoint is absent.

    Args:
        init_cfg (dict | list[dict] | None): the backbone's init_cfg.
    """
    pretrained, _ = split_pretrained_init_cfg(init_cfg)
    if pretrained is None:
        return
    path = str(pretrained['checkpoint'])
    if '://' not in path and not osp.isfile(osp.expanduser(path)):
        raise FileNotFoundError(
            f'VanillaNet init_cfg checkpoint {path!r} does not exist. Download the published ImageNet weights '
            f'from the VanillaNet GitHub releases (huawei-noah/VanillaNet, {RELEASES_URL}; the detectors '
            f'start from {DETECTION_CHECKPOINT}) and point at the file with --cfg-options '
            f'model.backbone.init_cfg.checkpoint=/path/to/{DETECTION_CHECKPOINT} '
            '(or set model.backbone.init_cfg=None to train from scratch).')


# ---- converting ---------------------------------------------------------------------------------


def fuse_state_dict(state_dict):
    """Fuse training-structure backbone weights into the deploy structure.

    Args:
        state_dict (Mapping[str, Tensor]): prefix-free training-structure weights.

    Returns:
        dict: deploy-structure weights (BN folded, 1x1 convs merged).
    """
    info = describe_state_dict(state_dict)
    if info.structure != 'training' or None in info.dims or info.act_num is None:
        raise VanillaNetWeightsError(f'Only complete training-structure VanillaNet weights can be fused; these '
                                     f'are {info.structure or "not VanillaNet"} weights (widths {info.dims}).')
    # Strides live in no weight and do not enter the fusion: any will do.
    arch = dict(dims=info.dims, strides=[1] * info.num_blocks)
    with torch.device('meta'):
        net = VanillaNet(arch=arch, act_num=info.act_num, in_channels=info.in_channels)
    state_dict = dict(state_dict)
    for k in net.state_dict():
        if k.endswith('num_batches_tracked') and k not in state_dict:
            state_dict[k] = torch.tensor(0)
    net.load_state_dict(state_dict, strict=True, assign=True)
    net.eval().switch_to_deploy()
    return {k: v.detach() for k, v in net.state_dict().items()}


def convert_backbone_checkpoint(src, dst, key=None, deploy=False):
    """Write a clean backbone checkpoint, ready for ``init_cfg=dict(type='Pretrained', checkpoint=dst)``.

    Args:
        src (str): a published classification checkpoint, or any format :func:`load_pretrained_backbone` reads.
        dst (str): output file: ``{'state_dict': backbone weights, 'meta': {...}}``.
        key (str | None): state dict to take (``model_ema`` or ``model``); None prefers ``model_ema``.
        deploy (bool): fuse into the deploy structure. Default: False.

    Returns:
        dict: ``source``, ``arch``, ``act_num``, ``structure`` (of the input), ``num_blocks``, ``params`` (input)
        and ``out_structure``, ``out_params`` (output).
    """
    state_dict, source = read_backbone_weights(src, key=key)
    info = describe_state_dict(state_dict)
    if info.structure is None:
        raise VanillaNetWeightsError(f'{source} holds no VanillaNet weights (first keys: {_first(state_dict)}).')
    out = fuse_state_dict(state_dict) if deploy and info.structure == 'training' else state_dict
    out_structure = 'deploy' if deploy else info.structure
    meta = dict(source=str(src), weights=source, arch=info.arch, act_num=info.act_num, dims=info.dims,
                structure=out_structure)
    torch.save(dict(state_dict=out, meta=meta), dst)
    return dict(source=source, arch=info.arch or _label(info), act_num=info.act_num, structure=info.structure,
                num_blocks=info.num_blocks, params=count_parameters(state_dict), out_structure=out_structure,
                out_params=count_parameters(out))
