"""Grad-CAM++ maps of a detector's backbone, explaining its top detections.

The map comes from torchcam's ``GradCAMpp``; this module supplies what a detector lacks for it: a scalar
target that is a differentiable function of the backbone output. mmdet's own ``predict`` detaches the
head outputs before post-processing, so the detections are recomputed here with mmdet's per-image
post-processing (decoding, score threshold, NMS) on the undetached outputs. The scores of the kept
detections then carry gradients back to the hooked layer, exactly as the detector computed them.

CAM target: the sum, over the top ``top_k`` detections scoring at least ``score_thr``, of the log-odds
``log(s / (1 - s))`` of each detection's score ``s``. For a sigmoid classifier (RetinaNet) that is the
class logit at the anchor that produced the detection, the analogue of the pre-softmax class score that
Grad-CAM++ is defined on; unlike ``s`` itself it does not flatten out for confident detections, so
every kept detection counts (until ``s`` rounds to 1 in float32, about logit 17).
"""
import difflib
import os.path as osp
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import mmcv
import numpy as np
import torch
import torch.nn.functional as F
from mmcv.transforms import Compose
from mmengine.dataset import pseudo_collate

from mmdet.apis import init_detector
from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
from mmdet.models.detectors import SingleStageDetector, TwoStageDetector
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.models.utils import select_single_mlvl
from mmdet.utils import get_test_pipeline_cfg

from ..checkpoint import VanillaNetWeightsError
from ..deploy import load_detector_checkpoint

try:
    from torchcam.methods import GradCAMpp
except ImportError:  # an optional extra: fail when used, not when imported
    GradCAMpp = None

_LOGIT_EPS = 1e-6


@dataclass
class DetectionCAM:
    """A Grad-CAM++ map and the detections it explains, in original image coordinates.

    Args:
        image (np.ndarray): the image, RGB, uint8, (H, W, 3).
        cam (np.ndarray | None): the map, float32 in [0, 1], (H, W); None when nothing was detected.
        bboxes (np.ndarray): the explained detections, (k, 4) as x1, y1, x2, y2, best first.
        scores (np.ndarray): their scores, (k,).
        labels (np.ndarray): their class indices, (k,).
        class_names (tuple[str]): names of the detector's classes.
        layer (str): the hooked module (a name in ``model.named_modules()``).
    """

    image: np.ndarray
    cam: Optional[np.ndarray]
    bboxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: Tuple[str, ...]
    layer: str


def load_detector(config, checkpoint, device='cpu', cfg_options=None):
    """Build a detector from its config and load a checkpoint strictly (through the plugin's safe loader).

    Unlike mmdet's ``init_detector`` alone, a checkpoint that does not fit the model is an error: a map
    of a half-loaded detector would explain nothing.

    Args:
        config (str | mmengine.Config): the detector config.
        checkpoint (str | None): the checkpoint file; None keeps the initial weights.
        device (str): where the model runs, e.g. ``'cpu'`` or ``'cuda:0'``.
        cfg_options (dict | None): config overrides, as ``--cfg-options`` gives them.

    Returns:
        torch.nn.Module: the detector in eval mode, with ``cfg`` and ``dataset_meta`` (classes from the
        checkpoint, else COCO's, as mmdet does) set.
    """
    import mmdet_vanillanet  # noqa: F401  (registers the plugin, installs the safe checkpoint loader)
    if isinstance(config, str) and not osp.isfile(config):
        raise FileNotFoundError(f'Config file {config!r} does not exist.')
    if checkpoint is not None and not osp.isfile(checkpoint):
        raise FileNotFoundError(f'Checkpoint {checkpoint!r} does not exist.')
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='checkpoint is None')
        model = init_detector(config, None, device=device, cfg_options=cfg_options)
    if checkpoint is None:
        return model
    try:
        meta = load_detector_checkpoint(model, checkpoint)
    except VanillaNetWeightsError as e:  # a misfit, explained in words; any other error is raised as it is
        raise VanillaNetWeightsError(f'Checkpoint {checkpoint} does not fit the detector of {config}: {e}') from e
    classes = meta.get('dataset_meta', {}).get('classes') or meta.get('CLASSES')
    if classes is None:
        warnings.warn(f'Checkpoint {checkpoint} names no classes; labels are drawn with COCO class names.')
    else:
        model.dataset_meta['classes'] = tuple(classes)
    return model


def backbone_output_layers(model):
    """Names of the modules whose outputs the backbone returns, in order.

    Known backbones: any with a timm-style ``feature_info`` naming its modules (VanillaNet) and mmdet's
    ResNet family (``res_layers`` and ``out_indices``). Others return an empty list: name the layer.

    Args:
        model (torch.nn.Module): the detector.
    """
    backbone = model.backbone
    info = getattr(backbone, 'feature_info', None)
    if isinstance(info, (list, tuple)) and info and all(isinstance(i, dict) and 'module' in i for i in info):
        return [f'backbone.{i["module"]}' for i in info]
    if hasattr(backbone, 'res_layers') and hasattr(backbone, 'out_indices'):
        return [f'backbone.{backbone.res_layers[i]}' for i in backbone.out_indices]
    return []


def resolve_layer(model, layer=None):
    """The module name to hook for ``layer``.

    Args:
        model (torch.nn.Module): the detector.
        layer (str | int | None): None for the backbone's last output; an int (or a string of one) to
            index the backbone's outputs (negative counts from the end); otherwise a module name as in
            ``model.named_modules()``, with or without the leading ``backbone.``.

    Returns:
        str: a name in ``model.named_modules()``.
    """
    outputs = backbone_output_layers(model)
    known = ', '.join(outputs) or 'unknown for this backbone'
    if layer is None or isinstance(layer, int) or str(layer).lstrip('-').isdigit():
        index = -1 if layer is None else int(layer)
        if not outputs:
            raise ValueError(f'Cannot tell which module produces the outputs of backbone '
                             f'{type(model.backbone).__name__}; name the layer to explain '
                             f'(e.g. --layer backbone.layer4, a name from model.named_modules()).')
        if not -len(outputs) <= index < len(outputs):
            raise ValueError(f'Backbone output index {index} is out of range: the backbone returns '
                             f'{len(outputs)} outputs ({known}).')
        return outputs[index]
    names = dict(model.named_modules())
    for name in (layer, f'backbone.{layer}'):
        if name in names and name:
            return name
    close = difflib.get_close_matches(layer, names, n=3) or difflib.get_close_matches(f'backbone.{layer}', names, n=3)
    hint = f' Closest names: {", ".join(close)}.' if close else ''
    raise ValueError(f'No module named {layer!r} in {type(model).__name__}. Backbone outputs: {known}; '
                     f'an index into them (0, -1, ...) works too.{hint}')


def _dense_head_predictions(model, feats, data_samples):
    """``bbox_head.predict`` without its detach: mmdet's per-image post-processing on the live outputs."""
    head = model.bbox_head
    outs = head(feats)
    cls_scores, bbox_preds = outs[0], outs[1]
    score_factors = outs[2] if len(outs) > 2 else None
    priors = head.prior_generator.grid_priors(
        [score.shape[-2:] for score in cls_scores], dtype=cls_scores[0].dtype, device=cls_scores[0].device)
    return head._predict_by_feat_single(
        cls_score_list=select_single_mlvl(cls_scores, 0, detach=False),
        bbox_pred_list=select_single_mlvl(bbox_preds, 0, detach=False),
        score_factor_list=(select_single_mlvl(score_factors, 0, detach=False) if score_factors is not None
                           else [None] * len(cls_scores)),
        mlvl_priors=priors,
        img_meta=data_samples[0].metainfo,
        cfg=head.test_cfg,
        rescale=True,
        with_nms=True)


def _two_stage_predictions(model, feats, data_samples):
    """Proposals as the detector makes them, then the R-CNN head's prediction, whose path keeps gradients."""
    proposals = data_samples[0].get('proposals', None)
    if proposals is None:
        proposals = model.rpn_head.predict(feats, data_samples, rescale=False)[0]
    roi_head = model.roi_head
    return roi_head.predict_bbox(feats, [data_samples[0].metainfo], [proposals], roi_head.test_cfg,
                                 rescale=True)[0]


def _predictor(model):
    """The function that gives ``model``'s detections with differentiable scores, or a clear refusal."""
    head = getattr(model, 'bbox_head', None)
    if (isinstance(model, SingleStageDetector) and isinstance(head, BaseDenseHead)
            and type(head).predict_by_feat is BaseDenseHead.predict_by_feat):
        return _dense_head_predictions
    if isinstance(model, TwoStageDetector) and type(getattr(model, 'roi_head', None)) is StandardRoIHead:
        return _two_stage_predictions
    parts = type(model).__name__ + (f' with {type(head).__name__}' if head is not None else '')
    raise NotImplementedError(
        f'Detection CAMs are not supported for {parts}. Supported: single-stage detectors whose dense head '
        f'keeps mmdet\'s BaseDenseHead.predict_by_feat (RetinaNet, FCOS, ATSS, GFL, ...) and two-stage '
        f'detectors with a StandardRoIHead (Faster R-CNN, Mask R-CNN).')


def _prepare_inputs(model, image_path):
    """Run the config's test pipeline (without annotation loading) and the data preprocessor."""
    steps = [step for step in get_test_pipeline_cfg(model.cfg) if not step['type'].endswith('Annotations')]
    data = Compose(steps)(dict(img_path=image_path, img_id=0))
    batch = model.data_preprocessor(pseudo_collate([data]), False)
    return batch['inputs'], batch['data_samples']


def _to_image_space(cam, metainfo):
    """Map a feature-map CAM to the original image: padded input, crop the padding, original size."""
    pad_h, pad_w = metainfo['batch_input_shape']
    img_h, img_w = metainfo['img_shape'][:2]
    ori_h, ori_w = metainfo['ori_shape'][:2]
    cam = F.interpolate(cam[None, None].float(), size=(pad_h, pad_w), mode='bilinear', align_corners=False)
    cam = F.interpolate(cam[..., :img_h, :img_w], size=(ori_h, ori_w), mode='bilinear', align_corners=False)[0, 0]
    cam = cam - cam.min()
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).cpu().numpy()


def detection_cam(model, image_path, layer=None, top_k=5, score_thr=0.3):
    """Grad-CAM++ of one backbone output with respect to the detector's top detections on an image.

    Args:
        model (torch.nn.Module): a detector from :func:`load_detector`.
        image_path (str): the image file.
        layer (str | int | None): the module to explain, see :func:`resolve_layer`; None: the backbone's
            last output.
        top_k (int): at most this many detections, the best, form the target.
        score_thr (float): only detections scoring at least this form the target.

    Returns:
        DetectionCAM: the map (None if no detection passes ``score_thr``) and the explained detections.
    """
    if GradCAMpp is None:
        raise ImportError('Detection CAMs need torchcam: pip install "mmdet_vanillanet[cam]" '
                          '(or pip install -r requirements/extras.txt).')
    if not osp.isfile(image_path):
        raise FileNotFoundError(f'Image {image_path!r} does not exist.')
    if top_k < 1:
        raise ValueError(f'top_k must be at least 1, got {top_k}.')
    predict = _predictor(model)
    layer_name = resolve_layer(model, layer)
    inputs, data_samples = _prepare_inputs(model, image_path)
    model.eval()
    with torch.enable_grad(), GradCAMpp(model, target_layer=layer_name) as extractor:
        # Gradients with respect to the input make the graph exist even where parameters are frozen.
        feats = model.extract_feat(inputs.float().requires_grad_(True))
        if extractor.hook_a[0] is None:
            raise ValueError(f'Layer {layer_name} did not run while the detector extracted features; '
                             f'choose one inside the backbone or neck.')
        if extractor.hook_a[0].dim() != 4:
            raise ValueError(f'Layer {layer_name} outputs a tensor of shape {tuple(extractor.hook_a[0].shape)}; '
                             f'a CAM needs a (N, C, H, W) feature map.')
        detections = predict(model, feats, data_samples)
        scores = detections.scores
        order = scores.argsort(descending=True)
        keep = order[scores[order] >= score_thr][:top_k]
        cam = None
        if len(keep):
            if not scores.requires_grad:
                raise NotImplementedError(f'The scores of {type(model).__name__} carry no gradient back to '
                                          f'{layer_name}; this detector cannot be explained this way.')
            target = torch.logit(scores[keep], eps=_LOGIT_EPS).sum()
            cam = extractor(class_idx=0, scores=target.reshape(1, 1))[0][0].detach()
            cam = _to_image_space(cam, data_samples[0].metainfo)
    kept = detections[keep]
    return DetectionCAM(
        image=mmcv.imread(image_path, channel_order='rgb'),
        cam=cam,
        bboxes=kept.bboxes.detach().cpu().numpy().reshape(-1, 4),
        scores=kept.scores.detach().cpu().numpy(),
        labels=kept.labels.cpu().numpy(),
        class_names=tuple(model.dataset_meta.get('classes', ())),
        layer=layer_name)


def box_contrast(cam, bbox):
    """Mean of a CAM inside a box and outside it.

    Args:
        cam (np.ndarray): the map, (H, W).
        bbox (Sequence[float]): x1, y1, x2, y2 in the map's pixels.

    Returns:
        tuple[float, float]: (mean inside, mean outside); outside is nan if the box covers the map.
    """
    h, w = cam.shape
    x1, y1, x2, y2 = np.round(np.asarray(bbox, dtype=float)).astype(int)
    inside = np.zeros((h, w), dtype=bool)
    inside[max(y1, 0):min(y2, h), max(x1, 0):min(x2, w)] = True
    mean_in = float(cam[inside].mean()) if inside.any() else float('nan')
    mean_out = float(cam[~inside].mean()) if (~inside).any() else float('nan')
    return mean_in, mean_out
