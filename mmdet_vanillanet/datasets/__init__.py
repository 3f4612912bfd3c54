"""Datasets: synthetic COCO-format shapes for demos and tests; checks of data configs and COCO annotation files."""
from .coco_file_checks import check_coco_annotations, validate_coco_file
from .errors import DataConfigError, DataNotFoundError
from .synthetic_coco import CLASSES, generate_synthetic_coco, synthetic_coco_metainfo

__all__ = ['CLASSES', 'DataConfigError', 'DataNotFoundError', 'check_coco_annotations', 'generate_synthetic_coco',
           'synthetic_coco_metainfo', 'validate_coco_file']
