"""Reading weights: safe (weights-only) loading, and mapping official key layouts onto ours.

Importing this package installs the safe loader (see :func:`install_safe_loading`), so that
``custom_imports=dict(imports=['mmdet_vanillanet'])`` is enough for mmdet's and mmengine's tools.
"""
from .safe_load import (EXTRA_SAFE_GLOBALS_ENV, SAFE_GLOBALS, CheckpointNotFoundError,
                        CheckpointReadError, UnsafeCheckpointError, install_safe_loading,
                        load_checkpoint_file, read_checkpoint)
from .weights import VanillaNetWeightsError, convert_backbone_checkpoint, load_pretrained_backbone

install_safe_loading()

__all__ = [
    'EXTRA_SAFE_GLOBALS_ENV', 'SAFE_GLOBALS', 'CheckpointNotFoundError', 'CheckpointReadError',
    'UnsafeCheckpointError', 'install_safe_loading', 'load_checkpoint_file', 'read_checkpoint',
    'VanillaNetWeightsError',
    'convert_backbone_checkpoint', 'load_pretrained_backbone'
]
