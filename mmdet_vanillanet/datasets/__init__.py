"""Datasets: a synthetic COCO-format instance-segmentation set of coloured shapes for demos and tests."""
from .synthetic_coco import CLASSES, generate_synthetic_coco, synthetic_coco_metainfo, validate_coco_file

__all__ = ['CLASSES', 'generate_synthetic_coco', 'synthetic_coco_metainfo', 'validate_coco_file']
