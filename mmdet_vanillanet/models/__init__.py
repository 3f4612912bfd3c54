# arch first: mmdet_vanillanet.checkpoint, which vanillanet.py imports, reads the arch table
from .arch import ARCH_SETTINGS, STEM_KERNEL, resolve_arch
from .vanillanet import SeriesActivation, VanillaBlock, VanillaNet

__all__ = ['ARCH_SETTINGS', 'STEM_KERNEL', 'SeriesActivation', 'VanillaBlock', 'VanillaNet', 'resolve_arch']
