from .vanillanet import ARCH_SETTINGS, SeriesActivation, VanillaBlock, VanillaNet, resolve_arch

__all__ = ['ARCH_SETTINGS', 'SeriesActivation', 'VanillaBlock', 'VanillaNet', 'resolve_arch']
