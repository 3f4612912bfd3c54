"""Reduced-precision inference on CPUs: bf16 for whole detectors, int8 for the VanillaNet backbone."""
from .bf16 import add_fp32_borders, bf16_available, bf16_inference
from .channels_last import channels_last_detector
from .hooks import Fp32PostprocessHook, Int8BackboneHook, configure_test_precision
from .int8 import Int8VanillaNet, load_calibration, quantize_vanillanet, replace_with_int8, save_calibration

__all__ = ['Fp32PostprocessHook', 'Int8BackboneHook', 'Int8VanillaNet', 'add_fp32_borders', 'bf16_available',
           'bf16_inference', 'channels_last_detector', 'configure_test_precision', 'load_calibration',
           'quantize_vanillanet', 'replace_with_int8', 'save_calibration']
