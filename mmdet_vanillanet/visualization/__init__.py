"""Pictures: Grad-CAM++ of a backbone output for a detector's top detections, and training curves.

The maps need the ``cam`` extra (torchcam); not imported by ``mmdet_vanillanet`` itself.
"""
from .cam import DetectionCAM, backbone_output_layers, box_contrast, detection_cam, load_detector, resolve_layer
from .draw import draw_detection_cam, save_cam_figure
from .training_curves import plot_training_curves, read_scalar_log, training_log_file

__all__ = ['DetectionCAM', 'backbone_output_layers', 'box_contrast', 'detection_cam', 'draw_detection_cam',
           'load_detector', 'plot_training_curves', 'read_scalar_log', 'resolve_layer', 'save_cam_figure',
           'training_log_file']
