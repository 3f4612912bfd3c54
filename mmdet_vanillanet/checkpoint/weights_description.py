"""What the keys and shapes of a state dict say about the VanillaNet that made it: structure, widths, act_num.

Reads the published key layouts of the training and deploy structures and knows the arch table, not the
network and not files.
"""
import re
from dataclasses import dataclass
from typing import List, Optional

from ..arch import ARCH_SETTINGS

BLOCK_KEY = re.compile(r'stages\.(\d+)\.')
BUFFER_SUFFIXES = ('running_mean', 'running_var', 'num_batches_tracked')

# structure -> (stem conv key, stem activation key, output conv key of block i)
STRUCTURE_KEYS = {
    'training': ('stem1.0.weight', 'stem2.2.weight', 'stages.{}.conv2.0.weight'),
    'deploy': ('stem.0.weight', 'stem.1.weight', 'stages.{}.conv.weight'),
}


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


def weights_label(info, name=None):
    """How messages name weights: ``name``, else the published arch name, else the widths."""
    return name or info.arch or 'dims ' + ', '.join(map(str, info.dims))
