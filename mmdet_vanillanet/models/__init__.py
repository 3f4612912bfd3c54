"""The VanillaNet backbone and how it runs (the arch table it reads is :mod:`mmdet_vanillanet.arch`)."""
from ..arch import ARCH_SETTINGS, STEM_KERNEL, resolve_arch
from .vanillanet import SeriesActivation, VanillaBlock, VanillaNet

__all__ = ['ARCH_SETTINGS', 'STEM_KERNEL', 'SeriesActivation', 'VanillaBlock', 'VanillaNet', 'resolve_arch']
