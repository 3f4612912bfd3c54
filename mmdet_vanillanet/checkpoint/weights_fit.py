"""Whether weights fit a VanillaNet and, if not, why in words ("checkpoint has 7x7 activation kernels (act_num=3),
the model has act_num=4"). The backbone checks every load with it; it knows no network and reads no file.
"""
import torch

from .weights_description import describe_model, describe_state_dict, weights_label
from .weights_error import SHOWN_KEYS, VanillaNetWeightsError, first_keys


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

    A missing ``num_batches_tracked`` is not counted: :func:`fill_num_batches_tracked` fills it before loading.

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


def fill_num_batches_tracked(state_dict, model_state):
    """``state_dict`` with 0 for every BN ``num_batches_tracked`` of the model it lacks (published weights have none).

    Args:
        state_dict (Mapping[str, Tensor]): the checkpoint's backbone weights.
        model_state (Mapping[str, Tensor]): the model's ``state_dict()`` (its keys are what counts).

    Returns:
        dict: a new state dict.
    """
    filled = dict(state_dict)
    for k in model_state:
        if k.endswith('num_batches_tracked') and k not in filled:
            filled[k] = torch.tensor(0)
    return filled


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
