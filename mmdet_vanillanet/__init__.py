"""VanillaNet for MMDetection 3.x.

Importing this package registers the plugin's parts in the mmdet / mmengine registries and installs the
safe checkpoint loader; nothing else runs on import.
"""
from . import checkpoint, datasets, engine, models, precision  # noqa: F401  (registration)

__version__ = '0.1.0'
