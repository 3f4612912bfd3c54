"""How a VanillaNet runs one forward call: the one decision, made from the state it is called in.

- ``PLAIN``: PyTorch's ops, module by module. Always available, and the only choice for training, gradients,
  the training structure, CUDA, tracing / export / ``torch.compile``, hooks on a submodule, the ada-pool variant.
- ``ONEDNN_FP32``: the fused network on oneDNN's blocked layout, ReLUs as conv post-ops (fp32, no autocast).
- ``ONEDNN_BF16``: the same in bf16, under ``torch.autocast('cpu', dtype=torch.bfloat16)`` (what mmengine's
  ``TestLoop(fp16=True)`` does on a CPU), with the fused weights converted to bf16 once. A CPU without native
  bf16 emulates it, correctly but slowly: it runs all the same (tests use that), with one warning.
"""
import enum

import torch

from .. import cpu_support
from . import onednn_inference


class Execution(enum.Enum):
    """The ways a VanillaNet forward can run (see the module docstring)."""

    PLAIN = 'plain'
    ONEDNN_FP32 = 'oneDNN fp32'
    ONEDNN_BF16 = 'oneDNN bf16'


def _plain_only(net, x):
    """Why ``net(x)`` must take the plain path, or '' when a oneDNN path may run."""
    if not (net.fast_inference and net.deploy):
        return 'fast_inference off or training structure'
    if net.ada_pool:
        return 'ada-pool blocks'
    if torch.is_grad_enabled():
        return 'gradients enabled'
    if x.device.type != 'cpu' or x.layout != torch.strided:
        return 'not a strided CPU tensor'
    if (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.onnx.is_in_onnx_export()):
        return 'tracing, scripting, compiling or exporting'
    if onednn_inference.has_forward_hooks(net):
        return 'forward hooks on a submodule'
    return ''


def _autocast_bf16():
    return torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16


def choose_execution(net, x):
    """The :class:`Execution` for ``net(x)``.

    Args:
        net (VanillaNet): the backbone, in its current state (structure, flags, hooks).
        x (Tensor): the input of the call.
    """
    if _plain_only(net, x):
        return Execution.PLAIN
    if torch.is_autocast_enabled('cpu'):
        if not _autocast_bf16() or x.dtype not in (torch.float32, torch.bfloat16):
            return Execution.PLAIN
        if not cpu_support.native_bf16():
            cpu_support.warn_once('VanillaNet: no native bf16 on this CPU (avx512_bf16 / AMX): bf16 under autocast '
                                  'is emulated, correctly but more slowly than fp32; run without autocast for speed.')
        return Execution.ONEDNN_BF16 if onednn_inference.fast_path_works(torch.bfloat16) else Execution.PLAIN
    if x.dtype != torch.float32:
        return Execution.PLAIN
    return Execution.ONEDNN_FP32 if onednn_inference.fast_path_works(torch.float32) else Execution.PLAIN
