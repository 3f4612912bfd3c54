"""A function applied to every tensor inside nested tuples, lists and dicts: a module's arguments and outputs,
as the hooks of reduced-precision inference rewrite them."""
import torch


def map_tensors(function, value):
    """``value`` with ``function(tensor)`` in place of every tensor inside (nested tuples, lists, dicts).

    Args:
        function (Callable[[Tensor], Tensor]): applied to each tensor.
        value: a tensor, a container of them, or anything else (returned as it is).
    """
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(function, item) for item in value)
    if isinstance(value, dict):
        return type(value)((key, map_tensors(function, item)) for key, item in value.items())
    return value
