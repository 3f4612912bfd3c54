"""Published classification checkpoints -> clean backbone checkpoints, optionally fused (``tools/convert_weights.py``).

Builds the network to fuse, so it sits above :mod:`mmdet_vanillanet.models` and
:mod:`mmdet_vanillanet.checkpoint`, which never import it.
"""
import torch

from .checkpoint.pretrained import read_backbone_weights
from .checkpoint.weights_description import count_parameters, describe_state_dict, weights_label
from .checkpoint.weights_error import VanillaNetWeightsError, first_keys
from .checkpoint.weights_fit import fill_num_batches_tracked
from .models import VanillaNet


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
    net.load_state_dict(fill_num_batches_tracked(state_dict, net.state_dict()), strict=True, assign=True)
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
        raise VanillaNetWeightsError(f'{source} holds no VanillaNet weights (first keys: {first_keys(state_dict)}).')
    out = fuse_state_dict(state_dict) if deploy and info.structure == 'training' else state_dict
    out_structure = 'deploy' if deploy else info.structure
    meta = dict(source=str(src), weights=source, arch=info.arch, act_num=info.act_num, dims=info.dims,
                structure=out_structure)
    torch.save(dict(state_dict=out, meta=meta), dst)
    return dict(source=source, arch=info.arch or weights_label(info), act_num=info.act_num, structure=info.structure,
                num_blocks=info.num_blocks, params=count_parameters(state_dict), out_structure=out_structure,
                out_params=count_parameters(out))
