"""The VanillaNet arch table: widths and per-block strides of every published variant, and custom archs.

Facts from the VanillaNet paper (Chen et al., NeurIPS 2023) and its reference code. Weights-reading code
(:mod:`mmdet_vanillanet.checkpoint`) names archs from this table without importing the network.
"""


def _vanillanet_13_dims(width):
    return [width, width, 2 * width] + [4 * width] * 7 + [8 * width, 8 * width]


_STRIDES_13 = [1, 2, 2, 1, 1, 1, 1, 1, 1, 2, 1]

# name -> dims (C0 ... Cn) and per-block strides; ``ada_pool`` lists blocks whose pool is adaptive.
ARCH_SETTINGS = {
    'vanillanet_5': dict(dims=[512, 1024, 2048, 4096], strides=[2, 2, 2]),
    'vanillanet_6': dict(dims=[512, 1024, 2048, 4096, 4096], strides=[2, 2, 2, 1]),
    'vanillanet_7': dict(dims=[512, 512, 1024, 2048, 4096, 4096], strides=[1, 2, 2, 2, 1]),
    'vanillanet_8': dict(dims=[512, 512, 1024, 2048, 2048, 4096, 4096], strides=[1, 2, 2, 1, 2, 1]),
    'vanillanet_9': dict(
        dims=[512, 512, 1024, 2048, 2048, 2048, 4096, 4096], strides=[1, 2, 2, 1, 1, 2, 1]),
    'vanillanet_10': dict(
        dims=[512, 512, 1024] + [2048] * 4 + [4096, 4096], strides=[1, 2, 2, 1, 1, 1, 2, 1]),
    'vanillanet_11': dict(
        dims=[512, 512, 1024] + [2048] * 5 + [4096, 4096], strides=[1, 2, 2, 1, 1, 1, 1, 2, 1]),
    'vanillanet_12': dict(
        dims=[512, 512, 1024] + [2048] * 6 + [4096, 4096], strides=[1, 2, 2, 1, 1, 1, 1, 1, 2, 1]),
    'vanillanet_13': dict(dims=_vanillanet_13_dims(512), strides=_STRIDES_13),
    'vanillanet_13_x1_5': dict(dims=_vanillanet_13_dims(768), strides=_STRIDES_13),
    'vanillanet_13_x1_5_ada_pool': dict(
        dims=_vanillanet_13_dims(768), strides=_STRIDES_13, ada_pool=[1, 2, 9]),
}

STEM_KERNEL = 4


def resolve_arch(arch):
    """Turn an arch name or dict into ``dict(dims, strides, ada_pool)``, validated.

    Args:
        arch (str | dict): a key of ``ARCH_SETTINGS`` or a dict with ``dims`` (list of C0 ... Cn),
            ``strides`` (one per block, n entries) and optionally ``ada_pool`` (indices of stride-2
            blocks whose max pool becomes an adaptive pool to ceil(h/2) x ceil(w/2); the stem then
            uses stride 3 with padding 1, as the released ada-pool network).
    """
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise ValueError(f'Unknown VanillaNet arch {arch!r}; valid names: '
                           f'{", ".join(ARCH_SETTINGS)}, or a dict(dims=[...], strides=[...]).')
        arch = ARCH_SETTINGS[arch]
    if not isinstance(arch, dict) or not {'dims', 'strides'} <= set(arch):
        raise TypeError(f'VanillaNet arch must be a name or a dict with "dims" and "strides", got {arch!r}.')
    unknown = set(arch) - {'dims', 'strides', 'ada_pool'}
    if unknown:
        raise ValueError(f'Unknown keys {sorted(unknown)} in VanillaNet arch dict; allowed: dims, strides, ada_pool.')
    dims, strides = list(arch['dims']), list(arch['strides'])
    ada_pool = sorted(arch.get('ada_pool') or [])
    if len(dims) != len(strides) + 1 or not strides:
        raise ValueError(f'VanillaNet arch needs len(dims) == len(strides) + 1 >= 2 (one output width per '
                         f'block plus the stem), got {len(dims)} dims and {len(strides)} strides.')
    if any(int(d) != d or d < 1 for d in dims) or any(int(s) != s or s < 1 for s in strides):
        raise ValueError(f'VanillaNet dims and strides must be positive integers, got {dims} and {strides}.')
    bad = [i for i in ada_pool if not 0 <= i < len(strides) or strides[i] != 2]
    if bad:
        raise ValueError(f'ada_pool blocks {bad} must be indices of stride-2 blocks; strides are {strides}.')
    return dict(dims=dims, strides=strides, ada_pool=ada_pool)
