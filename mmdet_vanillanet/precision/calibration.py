"""The images an int8 backbone is calibrated on, and calibrating every VanillaNet of a detector on them.

Calibration reads training images through the test pipeline (no augmentation: the statistics must describe
what inference sees) and the detector's own data preprocessor (normalised, padded as at test time).
"""
import copy
import hashlib
import os
import os.path as osp

import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import DefaultScope

from mmdet.registry import DATASETS

from ..deploy import load_detector_checkpoint
from ..detectors import build_detector, fuse_vanillanets
from ..models import VanillaNet
from ..output_comparison import relative_deviation
from .int8 import quantize_vanillanet, save_calibration


def _innermost(dataset_cfg):
    while 'dataset' in dataset_cfg:  # wrappers such as RepeatDataset, ClassBalancedDataset
        dataset_cfg = dataset_cfg['dataset']
    return dataset_cfg


def calibration_dataset(cfg):
    """The training split of ``cfg`` read through its test pipeline.

    Args:
        cfg (mmengine.Config): a detection config with ``train_dataloader`` and ``test_dataloader``.
    """
    dataset_cfg = copy.deepcopy(_innermost(cfg.train_dataloader.dataset))
    dataset_cfg['pipeline'] = copy.deepcopy(_innermost(cfg.test_dataloader.dataset)['pipeline'])
    dataset_cfg['test_mode'] = True
    with DefaultScope.overwrite_default_scope('mmdet'):
        return DATASETS.build(dataset_cfg)


def calibration_batches(model, dataset, num_images, seed=0):
    """``num_images`` images of ``dataset`` (a seeded random choice), one at a time, preprocessed by ``model``.

    Args:
        model (nn.Module): the detector (its ``data_preprocessor`` normalises and pads).
        dataset (Dataset): e.g. :func:`calibration_dataset`.
        num_images (int): how many images.
        seed (int): seed of the choice (a local generator; the global random state is untouched).

    Returns:
        tuple[list[Tensor], list]: the image batches and the chosen images' ``img_id`` (or index).
    """
    if num_images < 1 or num_images > len(dataset):
        raise ValueError(f'--num-images must lie in [1, {len(dataset)}] (the training split\'s size), '
                         f'got {num_images}.')
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images].tolist()
    if is_model_wrapper(model):
        model = model.module
    batches, image_ids = [], []
    with torch.no_grad():
        for index in order:
            data = pseudo_collate([dataset[index]])
            batches.append(model.data_preprocessor(data, False)['inputs'])
            image_ids.append(data['data_samples'][0].metainfo.get('img_id', index))
    return batches, image_ids


def calibrate_detector(model, batches):
    """An int8 copy of every VanillaNet of ``model``, calibrated on ``batches`` (the detector is not changed).

    Each backbone's observers see what that backbone receives: for a detector's ``backbone`` the images.

    Args:
        model (nn.Module): the detector with its trained weights.
        batches (Sequence[Tensor]): preprocessed image batches (:func:`calibration_batches`).

    Returns:
        dict[str, Int8VanillaNet]: module name -> int8 backbone.
    """
    if is_model_wrapper(model):
        model = model.module
    names = [name for name, module in model.named_modules() if isinstance(module, VanillaNet)]
    if names != ['backbone']:
        raise ValueError(f'int8 calibration supports a VanillaNet as the detector\'s backbone; this detector has '
                         f'VanillaNets at {names or "no module"}.')
    return {name: quantize_vanillanet(model.get_submodule(name), calibration_inputs=batches) for name in names}


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def write_int8_calibration(config, checkpoint, out, num_images=32, seed=0):
    """Calibrate the int8 backbone of a trained detector and write the calibration file ``out``.

    Builds the detector of ``config``, loads ``checkpoint`` strictly, fuses its VanillaNet, runs
    ``num_images`` training images (test pipeline) through histogram observers and saves their statistics
    with what produced them (:func:`mmdet_vanillanet.precision.int8.save_calibration`). ``tools/test.py
    CONFIG CHECKPOINT --int8 out`` then evaluates the int8 detector.

    Args:
        config (str): the detector's config (training or deploy form).
        checkpoint (str): its trained or fused checkpoint.
        out (str): the ``.pth`` file to write.
        num_images (int): calibration images from the training split. Default: 32.
        seed (int): seed of their choice. Default: 0.

    Returns:
        dict: ``out``, ``num_images``, ``max_rel`` (int8 against fp32 backbone outputs on the first
        calibration image, :func:`~mmdet_vanillanet.output_comparison.relative_deviation`).
    """
    cfg = Config.fromfile(config)
    model = build_detector(cfg.model)
    load_detector_checkpoint(model, checkpoint)
    fuse_vanillanets(model)
    batches, image_ids = calibration_batches(model, calibration_dataset(cfg), num_images, seed)
    print_log(f'int8: calibrating on {len(batches)} training images', logger='current')
    int8 = calibrate_detector(model, batches)
    with torch.no_grad():
        deviation = relative_deviation(model.backbone(batches[0]), int8['backbone'](batches[0]))
    meta = dict(config=osp.abspath(config), checkpoint=osp.abspath(checkpoint), checkpoint_sha256=_sha256(checkpoint),
                num_images=len(batches), seed=seed, image_ids=[int(i) for i in image_ids],
                quantizer='torchao X86InductorQuantizer, default static config (per-channel weights, '
                          'histogram-observed activations)',
                torch=str(torch.__version__), torchao=_torchao_version(), backbone_max_rel=deviation["max_rel"])
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    save_calibration(out, int8, meta)
    return dict(out=out, num_images=len(batches), max_rel=deviation['max_rel'])


def _torchao_version():
    import torchao
    return str(torchao.__version__)
