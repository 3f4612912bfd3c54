"""What a detector computes on fixed inputs, and how far two sets of outputs are apart.

- :func:`padded_shape`, :func:`random_batch`: inputs the way the detector's data preprocessor pads them;
- :func:`detector_outputs`, :func:`flatten_tensors`: what a detector computes, as a flat list of tensors;
- :func:`relative_deviation`: the one definition of how far two sets of outputs are apart, used by deploy,
  export, the precision comparison, the benchmark and the tests (non-finite values fail it:
  :class:`NonFiniteOutputsError`);
- :func:`check_deviation`: that deviation held to a tolerance, failures raised as the caller's error.
"""
import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from mmdet.structures import DetDataSample


def padded_shape(model, shape):
    """``(height, width)`` rounded up to the detector's ``pad_size_divisor``, as its data preprocessor pads.

    Args:
        model (nn.Module): the detector.
        shape (tuple[int, int]): height and width.
    """
    divisor = getattr(model.data_preprocessor, 'pad_size_divisor', 1) or 1
    return tuple(math.ceil(side / divisor) * divisor for side in shape)


def random_batch(model, shape=(320, 320), num_images=2, seed=0):
    """Fixed random (already normalised) images and matching data samples for ``mode='tensor'``.

    Args:
        model (nn.Module): the detector (its ``data_preprocessor`` gives the padding divisor).
        shape (tuple[int, int]): image height and width, rounded up to the padding divisor.
        num_images (int): batch size.
        seed (int): seed of a local generator (the global random state is not touched).
    """
    height, width = padded_shape(model, shape)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_images, 3, height, width, generator=generator)
    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                batch_input_shape=(height, width), scale_factor=(1.0, 1.0))
    return inputs, [DetDataSample(metainfo=meta) for _ in range(num_images)]


def flatten_tensors(outputs):
    """The tensors of nested tuples, lists and dicts, in order.

    Args:
        outputs: a tensor, or (nested) tuples / lists / dicts of tensors; anything else is skipped.
    """
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        outputs = list(outputs.values())
    if isinstance(outputs, (list, tuple)):
        return [t for item in outputs for t in flatten_tensors(item)]
    return []


@torch.no_grad()
def detector_outputs(model, inputs, data_samples, proposals=None):
    """What the detector computes, as a flat list of tensors; two-stage detectors at fixed proposals.

    Single-stage detectors: the raw outputs of ``mode='tensor'`` (``_forward``). Two-stage detectors
    (with a ``roi_head``): the neck's features, the RPN head's raw outputs and the RoI head's outputs for
    ``proposals``. Comparing RoI outputs at proposals that each model chose itself would compare different
    boxes wherever the RPN's top-k choice flips between nearly equal scores.

    Args:
        model (nn.Module): the detector, in eval mode.
        inputs (Tensor): a batch of images.
        data_samples (list[DetDataSample]): their metainfo.
        proposals (list[InstanceData] | None): the proposals at which a two-stage detector's RoI head is
            evaluated; None: the RPN's own (return them to compare another model at the same boxes).

    Returns:
        tuple[list[Tensor], list[InstanceData] | None]: the outputs, and the proposals used.
    """
    if not hasattr(model, 'roi_head'):
        return [t.detach().clone() for t in flatten_tensors(model(inputs, data_samples, mode='tensor'))], None
    features = model.extract_feat(inputs)
    if proposals is None:
        proposals = model.rpn_head.predict(features, data_samples, rescale=False)
    outputs = [features, model.rpn_head(features), model.roi_head.forward(features, proposals, data_samples)]
    return [t.detach().clone() for t in flatten_tensors(outputs)], proposals


class NonFiniteOutputsError(ValueError):
    """Compared outputs hold NaN or infinite values: no deviation can be measured, the check fails.

    Args:
        message (str): which side's outputs hold what, e.g. "outputs: output 3 holds 12 NaN".
    """


def non_finite_description(tensors):
    """What non-finite values a list of tensors holds, one phrase per tensor ("output 3 holds 12 NaN").

    Args:
        tensors (Sequence[Tensor]): the outputs, counted from 0.

    Returns:
        list[str]: empty when every value is finite.
    """
    phrases = []
    for index, tensor in enumerate(tensors):
        tensor = tensor.detach()
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            continue
        counts = [(int(torch.isnan(tensor).sum()), 'NaN'), (int(torch.isposinf(tensor).sum()), '+Inf'),
                  (int(torch.isneginf(tensor).sum()), '-Inf')]
        held = ' and '.join(f'{count} {kind}' for count, kind in counts if count)
        phrases.append(f'output {index} holds {held} (of {tensor.numel()} values)')
    return phrases


def relative_deviation(reference, outputs, names=('reference', 'outputs')):
    """How far ``outputs`` are from ``reference``: the worst, over the paired tensors, of max |a - b| / max |a|.

    Each tensor is measured against its own largest magnitude, so a small output (box deltas beside
    logits, a fine feature map beside a coarse one) counts as much as a large one; an all-zero reference
    tensor is measured absolutely. A NaN or infinite value on either side is no deviation but a failure
    (:class:`NonFiniteOutputsError`): compared by magnitude it would vanish. This one definition is what
    ``tools/deploy.py`` (1e-3), ``tools/export_onnx.py`` (1e-4), the benchmark and the layout tests report.

    Args:
        reference (Sequence[Tensor]): the reference outputs.
        outputs (Sequence[Tensor]): the outputs to check, same number and shapes.
        names (tuple[str, str]): what the two sides are, for the messages. Default: ('reference', 'outputs').

    Returns:
        dict: ``max_rel`` (the deviation), ``max_abs`` (the largest absolute difference), ``num_tensors``.

    Raises:
        ValueError: the two sides differ in number or shapes of tensors.
        NonFiniteOutputsError: a NaN or infinite value on either side.
    """
    reference, outputs = list(reference), list(outputs)
    shapes = [tuple(t.shape) for t in reference], [tuple(t.shape) for t in outputs]
    if shapes[0] != shapes[1]:
        raise ValueError(f'Cannot compare outputs of different shapes: {names[1]} {shapes[1]} against '
                         f'{names[0]} {shapes[0]}.')
    non_finite = [f'{name}: {"; ".join(phrases)}' for name, phrases in
                  zip(names, (non_finite_description(reference), non_finite_description(outputs))) if phrases]
    if non_finite:
        raise NonFiniteOutputsError(f'Non-finite values, no deviation can be measured: {". ".join(non_finite)}.')
    max_rel = max_abs = 0.0
    for ref, out in zip(reference, outputs):
        if not ref.numel():
            continue
        ref = ref.detach().float().cpu()
        diff = float((ref - out.detach().float().cpu()).abs().max())
        scale = float(ref.abs().max())
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale else diff)
    return dict(max_rel=max_rel, max_abs=max_abs, num_tensors=len(reference))


class DeviationMessages(NamedTuple):
    """The messages of a failed :func:`check_deviation`, as ``str.format`` templates.

    Args:
        non_finite (str): a side holds NaN or Inf; ``{error}`` is :class:`NonFiniteOutputsError`'s message.
        other_outputs (str): the sides differ in number or shapes; ``{error}`` says how.
        too_far (str): the deviation exceeds the tolerance; with ``{max_rel}``, ``{max_abs}``, ``{tolerance}``.
    """

    non_finite: str
    other_outputs: str
    too_far: str


def check_deviation(reference, outputs, tolerance, names, error, messages):
    """:func:`relative_deviation` of ``outputs`` from ``reference``, raising ``error`` beyond ``tolerance``.

    Args:
        reference (Sequence[Tensor]): the reference outputs.
        outputs (Sequence[Tensor]): the outputs to check.
        tolerance (float): largest allowed ``max_rel``.
        names (tuple[str, str]): what the two sides are, for :func:`relative_deviation`'s messages.
        error (type[Exception]): what a failure raises.
        messages (DeviationMessages): the message of each failure.

    Returns:
        dict: as :func:`relative_deviation`.
    """
    try:
        result = relative_deviation(reference, outputs, names=names)
    except NonFiniteOutputsError as err:
        raise error(messages.non_finite.format(error=err)) from None
    except ValueError as err:
        raise error(messages.other_outputs.format(error=err)) from None
    if result['max_rel'] > tolerance:
        raise error(messages.too_far.format(tolerance=tolerance, **result))
    return result
