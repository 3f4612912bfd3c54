"""Published (or converted, or detector) weights into a VanillaNet: read safely, check, load strictly, log.

Flow: safe load -> pick ``model_ema`` / ``model`` / ``state_dict`` (or a bare state dict) -> strip the
``module.`` (DDP) and ``backbone.`` (detector) prefixes, drop the classifier -> describe the weights from
their shapes and compare them with the model -> load strictly, or, only when asked, partially with
every skipped key logged -> log one line saying what was loaded. Also what an ``init_cfg`` Pretrained entry
may hold, and the early check that its file exists.
"""
import logging
import os.path as osp
from collections.abc import Mapping

from mmengine.logging import print_log
from mmengine.model.weight_init import PretrainedInit

from .safe_load import read_checkpoint
from .state_dict_selection import STATE_DICT_KEYS, filter_state_dict, select_state_dict
from .weights_description import weights_label
from .weights_error import VanillaNetWeightsError
from .weights_fit import compare_with_model, difference_lines, fill_num_batches_tracked, misfit_message

RELEASES_URL = 'https://github.com/huawei-noah/VanillaNet/releases'
DETECTION_CHECKPOINT = 'vanillanet_13_act_num_4_kd_pretrain.pth'
PRETRAINED_KEYS = ('type', 'checkpoint', 'prefix', 'map_location', 'key', 'allow_partial')


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


# ---- loading ------------------------------------------------------------------------------------


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
        raise VanillaNetWeightsError(misfit_message(source, causes, diff))
    state_dict = fill_num_batches_tracked(state_dict, model_state)
    skipped, loaded = [], len(model_state)
    if not fits:
        bad_shapes = {k for k, _, _ in diff['shapes']}
        usable = {k: v for k, v in state_dict.items() if k in model_state and k not in bad_shapes}
        if not usable:
            raise VanillaNetWeightsError(f'Nothing in {source} fits this VanillaNet, even as a partial load: '
                                         + ('; '.join(causes) or 'no key in common') + '.')
        print_log(f'Partial load of VanillaNet weights from {source}: ' + ('; '.join(causes) or 'keys differ'),
                  logger='current', level=logging.WARNING)
        for line in difference_lines(diff, limit=len(model_state) + len(state_dict)):
            print_log(f'  skipped {line}', logger='current', level=logging.WARNING)
        skipped = diff['missing'] + diff['unexpected'] + sorted(bad_shapes)
        state_dict, loaded = {**model_state, **usable}, len(usable)
    backbone.load_state_dict(state_dict, strict=True)
    return dict(source=source, arch=found.arch or weights_label(found), act_num=found.act_num,
                structure=found.structure,
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
