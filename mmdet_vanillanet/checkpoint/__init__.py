"""Reading weights: safe (weights-only) loading, official key layouts, published weights into a backbone.

Importing this package installs the safe loader (see :func:`install_safe_loading`), so that
``custom_imports=dict(imports=['mmdet_vanillanet'])`` is enough for mmdet's and mmengine's tools.
"""
from .pretrained import load_pretrained_backbone
from .safe_load import (
                        EXTRA_SAFE_GLOBALS_ENV,
                        SAFE_GLOBALS,
                        CheckpointDownloadError,
                        CheckpointNotFoundError,
                        CheckpointReadError,
                        UnsafeCheckpointError,
                        install_safe_loading,
                        load_checkpoint_file,
                        read_checkpoint,
)
from .weights_description import describe_state_dict
from .weights_error import VanillaNetWeightsError
from .weights_fit import check_backbone_state_dict

install_safe_loading()

__all__ = [
    'EXTRA_SAFE_GLOBALS_ENV', 'SAFE_GLOBALS', 'CheckpointDownloadError', 'CheckpointNotFoundError',
    'CheckpointReadError', 'UnsafeCheckpointError', 'install_safe_loading', 'load_checkpoint_file', 'read_checkpoint',
    'VanillaNetWeightsError', 'check_backbone_state_dict', 'describe_state_dict', 'load_pretrained_backbone'
]
