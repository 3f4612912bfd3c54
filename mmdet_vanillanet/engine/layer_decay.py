"""Layer-wise learning-rate decay for detectors with a VanillaNet backbone."""
from typing import Dict, List, Optional

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor

from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS

from ..models.vanillanet import VanillaNet

STEM_NAMES = ('stem', 'stem1', 'stem2')  # deploy and training structure


def default_num_layers(num_blocks: int) -> int:
    """The number of backbone layer ids that ``num_blocks`` blocks need.

    Blocks are paired (block k gets id ``k // 2 + 1``), so VanillaNet-13's 11 blocks need 6.
    """
    return (num_blocks - 1) // 2 + 1


def get_layer_id(param_name: str, num_layers: int) -> int:
    """Layer id of a detector parameter, as the VanillaNet reference assigns it.

    0 for the stem, ``k // 2 + 1`` for backbone block k and ``num_layers + 1`` for every parameter
    outside the backbone (neck, heads).

    Args:
        param_name (str): Parameter name in the detector, e.g. ``backbone.stages.3.conv1.0.weight``.
        num_layers (int): Number of layer ids the backbone blocks use.

    Returns:
        int: The layer id.
    """
    parts = param_name.split('.')
    if parts[0] != 'backbone':
        return num_layers + 1
    if parts[1] in STEM_NAMES:
        return 0
    if parts[1] == 'stages' and len(parts) > 2 and parts[2].isdigit():
        return int(parts[2]) // 2 + 1
    raise ValueError(f'Cannot assign a layer id to the backbone parameter "{param_name}": '
                     f'layer-wise decay knows the stem ({", ".join(STEM_NAMES)}) and '
                     '"stages.<k>" only.')


def describe_layer(layer_id: int, num_layers: int, num_blocks: int) -> str:
    """Which part of the detector a layer id covers, for the log table."""
    if layer_id == 0:
        return 'backbone stem'
    if layer_id == num_layers + 1:
        return 'outside the backbone'
    first = 2 * (layer_id - 1)
    last = min(first + 1, num_blocks - 1)
    return f'backbone block {first}' if first == last else f'backbone blocks {first}-{last}'


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class VanillaNetLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Optimizer wrapper constructor with layer-wise lr decay for a VanillaNet backbone.

    Parameters get a layer id (0 for the stem, ``k // 2 + 1`` for block k, ``num_layers + 1``
    outside the backbone) and the learning rate
    ``lr * decay_rate ** (num_layers + 1 - layer_id)``, so the neck and heads train at the full
    lr and each pair of blocks closer to the input at ``decay_rate`` times the lr of the next.
    Biases and 1-D parameters (norms) get no weight decay, all others the optimizer's
    ``weight_decay``. Frozen parameters (``requires_grad=False``) are left out. The model must
    have a ``backbone`` attribute holding a :class:`VanillaNet` (training or deploy structure).

    mmdet's ``LearningRateDecayOptimizerConstructor`` supports only ConvNeXt, hence this class.

    Args:
        optim_wrapper_cfg (dict): Config of the optimizer wrapper, with ``optimizer`` (which must
            set ``lr``; ``weight_decay`` is optional).
        paramwise_cfg (dict): Layer-decay settings, no other keys allowed:

            - ``decay_rate`` (float, required): lr ratio between neighbouring layer ids, in
              (0, 1]; the paper uses 0.6.
            - ``num_layers`` (int, optional): number of layer ids the backbone blocks use.
              Defaults to ``(num_blocks - 1) // 2 + 1`` from the model (6 for VanillaNet-13).
              A larger value lowers all backbone lrs; a smaller one than the model needs is an
              error.

    Example:
        >>> optim_wrapper = dict(
        ...     type='OptimWrapper',
        ...     optimizer=dict(type='AdamW', lr=8e-5, betas=(0.9, 0.999), weight_decay=0.05),
        ...     constructor='VanillaNetLayerDecayOptimizerConstructor',
        ...     paramwise_cfg=dict(decay_rate=0.6, num_layers=6))
    """

    ALLOWED_KEYS = ('decay_rate', 'num_layers')

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        cfg = self.paramwise_cfg
        unknown = sorted(set(cfg) - set(self.ALLOWED_KEYS))
        if unknown:
            raise ValueError(f'{type(self).__name__} got unsupported paramwise_cfg keys {unknown}; '
                             f'allowed are {list(self.ALLOWED_KEYS)}.')
        if 'decay_rate' not in cfg:
            raise ValueError(f'{type(self).__name__} needs paramwise_cfg=dict(decay_rate=...) '
                             '(the VanillaNet detection recipe uses 0.6).')
        self.decay_rate = float(cfg['decay_rate'])
        if not 0 < self.decay_rate <= 1:
            raise ValueError(f'decay_rate must be in (0, 1], got {cfg["decay_rate"]}.')
        self.num_layers = cfg.get('num_layers')
        if self.num_layers is not None and (not isinstance(self.num_layers, int)
                                            or self.num_layers < 1):
            raise ValueError(f'num_layers must be a positive int, got {self.num_layers!r}.')
        if self.base_lr is None:
            raise ValueError(f'{type(self).__name__} needs the optimizer\'s lr to scale it.')

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        """Append one param group per (layer id, decay / no decay) to ``params``.

        Args:
            params (list[dict]): Param groups, extended in place.
            module (nn.Module): The detector (already unwrapped from DDP by ``__call__``).
        """
        backbone = getattr(module, 'backbone', None)
        if not isinstance(backbone, VanillaNet):
            raise TypeError(f'{type(self).__name__} needs a model whose `backbone` is a '
                            f'VanillaNet, got {type(module).__name__} with backbone '
                            f'{type(backbone).__name__}. Use DefaultOptimWrapperConstructor '
                            'for other backbones.')
        needed = default_num_layers(backbone.num_blocks)
        num_layers = needed if self.num_layers is None else self.num_layers
        if num_layers < needed:
            raise ValueError(f'paramwise_cfg num_layers={num_layers} is too small for a '
                             f'VanillaNet with {backbone.num_blocks} blocks: block '
                             f'{backbone.num_blocks - 1} gets layer id {needed}. Set '
                             f'num_layers >= {needed} or leave it out to derive it.')

        groups: Dict[str, dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            layer_id = get_layer_id(name, num_layers)
            no_decay = param.ndim == 1 or name.endswith('.bias')
            group_name = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
            if group_name not in groups:
                scale = self.decay_rate**(num_layers + 1 - layer_id)
                group = dict(params=[], lr=self.base_lr * scale, lr_scale=scale,
                             layer_id=layer_id, group_name=group_name)
                if no_decay:
                    group['weight_decay'] = 0.
                elif self.base_wd is not None:
                    group['weight_decay'] = self.base_wd
                groups[group_name] = group
            groups[group_name]['params'].append(param)

        ordered = sorted(groups.values(), key=lambda g: (g['layer_id'], g['group_name']))
        self._log_groups(ordered, num_layers, backbone.num_blocks)
        params.extend(ordered)

    def _log_groups(self, groups: List[dict], num_layers: int, num_blocks: int) -> None:
        header = ('group', 'covers', 'lr_scale', 'lr', 'weight_decay', 'tensors', 'numel')
        rows = [header]
        for g in groups:
            rows.append((g['group_name'], describe_layer(g['layer_id'], num_layers, num_blocks),
                         f'{g["lr_scale"]:.6g}', f'{g["lr"]:.4g}',
                         str(g.get('weight_decay', 'optimizer default')),
                         str(len(g['params'])), str(sum(p.numel() for p in g['params']))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ['  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                 for row in rows]
        print_log(f'{type(self).__name__}: decay_rate={self.decay_rate}, '
                  f'num_layers={num_layers}, base lr={self.base_lr}, '
                  f'weight_decay={self.base_wd}\n' + '\n'.join(lines), logger='current')
