"""Visual explanations of detectors: Grad-CAM++ of a backbone output for the top detections.

Needs the ``cam`` extra (torchcam); not imported by ``mmdet_vanillanet`` itself.
"""
from .cam import DetectionCAM, backbone_output_layers, box_contrast, detection_cam, load_detector, resolve_layer
from .draw import draw_detection_cam, save_cam_figure

__all__ = ['DetectionCAM', 'backbone_output_layers', 'box_contrast', 'detection_cam', 'draw_detection_cam',
           'load_detector', 'resolve_layer', 'save_cam_figure']
