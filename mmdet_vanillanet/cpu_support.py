"""What this CPU runs natively in reduced precision: bf16 (avx512_bf16 / AMX-BF16) and int8 (VNNI / AMX-INT8).

Elsewhere torch and oneDNN emulate these types, correctly but slowly, so the tools run fp32 there and say so
once. ``VANILLANET_NO_NATIVE=bf16,int8`` (either or both) makes a CPU that has them behave as one that
lacks them, which is how the fallback is tested on any machine.
"""
import functools
import os
import warnings

import torch

NO_NATIVE_ENV = 'VANILLANET_NO_NATIVE'
PRECISIONS = ('bf16', 'int8')


def _disabled():
    names = {name.strip() for name in os.environ.get(NO_NATIVE_ENV, '').split(',') if name.strip()}
    unknown = names - set(PRECISIONS)
    if unknown:
        raise ValueError(f'{NO_NATIVE_ENV}={os.environ[NO_NATIVE_ENV]!r} names {sorted(unknown)}; it takes a '
                         f'comma-separated subset of {", ".join(PRECISIONS)}.')
    return names


def native_bf16():
    """Whether the CPU computes bf16 in hardware (avx512_bf16 or AMX-BF16) and ``VANILLANET_NO_NATIVE`` allows it."""
    if 'bf16' in _disabled():
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def native_int8():
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI / AVX-VNNI or AMX-INT8) and
    ``VANILLANET_NO_NATIVE`` allows them."""
    if 'int8' in _disabled():
        return False
    return bool(torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())


def describe():
    """One line for logs and benchmark reports, e.g. ``'native bf16: yes (avx512_bf16, amx); native int8: yes'``."""
    features = [name for name, present in (('avx512_bf16', torch.cpu._is_avx512_bf16_supported()),
                                           ('amx', torch.cpu._is_amx_tile_supported()),
                                           ('vnni', torch.cpu._is_vnni_supported())) if present]
    forced = f'; {NO_NATIVE_ENV}={os.environ[NO_NATIVE_ENV]}' if os.environ.get(NO_NATIVE_ENV) else ''
    return (f'native bf16: {"yes" if native_bf16() else "no"}, native int8: {"yes" if native_int8() else "no"} '
            f'(CPU features: {", ".join(features) or "none of avx512_bf16, amx, vnni"}{forced})')


@functools.lru_cache(maxsize=None)
def warn_once(message):
    """Warn with ``message`` the first time only (per process)."""
    warnings.warn(message, stacklevel=3)
