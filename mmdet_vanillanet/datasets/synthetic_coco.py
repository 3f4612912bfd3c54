"""A synthetic COCO-format instance-segmentation dataset of coloured shapes.

Each image holds a few shapes (see ``CLASSES``) of random size, rotation and colour on a textured
background. Shapes drawn later occlude earlier ones; every annotation describes the *visible* part of its
shape (RLE mask, bbox and area all come from that mask through pycocotools). Every image is drawn from its
own random generator seeded by ``(seed, split, index)``, so a dataset is reproducible byte for byte and the
train and val splits never share an image.

Layout written under ``out_dir``::

    train/000000.png ...              val/000000.png ...
    annotations/instances_train.json  annotations/instances_val.json
    meta.json                         the parameters it was made with (used to skip regeneration)
"""
import glob
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from mmengine.utils import ProgressBar
from pycocotools import mask as mask_utils

from .coco_file_checks import validate_coco_file

CLASSES = ('circle', 'square', 'triangle', 'star', 'cross')
PALETTE = ((220, 20, 60), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180))
SPLITS = ('train', 'val')

# Bump when the drawing changes, so that datasets cached on disk by an older version are regenerated.
GENERATOR_VERSION = 1
# cv2.fillPoly takes fixed-point vertices: coordinates are multiplied by 2**_SHIFT for sub-pixel accuracy.
_SHIFT = 4
# A candidate colour must differ (RGB euclidean distance) this much from the canvas under the shape.
_MIN_CONTRAST = 60.0
_PLACEMENT_TRIES = 20


def synthetic_coco_metainfo() -> dict:
    """The mmdet ``metainfo`` for this dataset: ``dict(classes=CLASSES, palette=[...])``.

    Use it in a config as ``dataset=dict(type='CocoDataset', metainfo=..., ...)``.
    """
    return dict(classes=CLASSES, palette=[tuple(c) for c in PALETTE])


def generate_synthetic_coco(out_dir: str,
                            num_train: int = 300,
                            num_val: int = 100,
                            image_size: Union[int, Sequence[int]] = 256,
                            num_objects: Tuple[int, int] = (1, 6),
                            object_size: Tuple[float, float] = (0.1, 0.4),
                            min_visible_fraction: float = 0.5,
                            min_area: int = 16,
                            seed: int = 0,
                            force: bool = False,
                            show_progress: bool = True) -> Dict[str, str]:
    """Write the dataset (images and COCO json for both splits), validate it, and return its paths.

    If ``out_dir/meta.json`` records the same parameters and all files are present, nothing is written.

    Args:
        out_dir (str): Root folder. When the dataset is (re)generated, only the files this function
            writes there (``meta.json``, ``annotations/instances_*.json``, ``{train,val}/NNNNNN.png``) are
            removed first; nothing else there is touched.
        num_train (int): Number of training images.
        num_val (int): Number of validation images.
        image_size (int | tuple[int, int]): Side of square images, or ``(width, height)``.
        num_objects (tuple[int, int]): Inclusive range of shapes placed per image. Fewer may end up
            annotated when a shape cannot be placed without hiding too much of the others.
        object_size (tuple[float, float]): Range of a shape's diameter as a fraction of the image's shorter
            side, sampled log-uniformly.
        min_visible_fraction (float): A new shape is placed only where every earlier shape keeps at least
            this fraction of its own area visible.
        min_area (int): Annotations whose visible area (pixels) is below this are dropped.
        seed (int): Seed of the whole dataset.
        force (bool): Regenerate even if a matching dataset exists.
        show_progress (bool): Show an mmengine progress bar while writing images.

    Returns:
        dict[str, str]: ``root``, ``meta_file``, and ``{split}_img_dir`` / ``{split}_ann_file`` for
        ``split`` in ``('train', 'val')``.
    """
    params = _generation_params(num_train, num_val, image_size, num_objects, object_size, min_visible_fraction,
                                min_area, seed)
    paths = _dataset_paths(out_dir)
    if force or not _is_cached(paths, params):
        _write_dataset(paths, params, show_progress)
    return paths


def _generation_params(num_train: int, num_val: int, image_size: Union[int, Sequence[int]],
                       num_objects: Tuple[int, int], object_size: Tuple[float, float], min_visible_fraction: float,
                       min_area: int, seed: int) -> dict:
    """The checked arguments of :func:`generate_synthetic_coco` as ``meta.json`` records them."""
    width, height = _parse_image_size(image_size)
    _check_ranges(num_objects, object_size, min_visible_fraction)
    return dict(
        generator_version=GENERATOR_VERSION,
        num_train=int(num_train),
        num_val=int(num_val),
        width=width,
        height=height,
        num_objects=[int(v) for v in num_objects],
        object_size=[float(v) for v in object_size],
        min_visible_fraction=float(min_visible_fraction),
        min_area=int(min_area),
        seed=int(seed),
        classes=list(CLASSES))


def _write_dataset(paths: Dict[str, str], params: dict, show_progress: bool) -> None:
    """Replace what an earlier run wrote by both splits' images and checked annotation files, then ``meta.json``."""
    _remove_generated_files(paths)
    for split in SPLITS:
        os.makedirs(paths[f'{split}_img_dir'], exist_ok=True)
    os.makedirs(osp.dirname(paths['train_ann_file']), exist_ok=True)

    counts = dict(train=params['num_train'], val=params['num_val'])
    progress = ProgressBar(sum(counts.values())) if show_progress else None
    for split_code, split in enumerate(SPLITS):
        coco = _generate_split(split_code, counts[split], params, paths[f'{split}_img_dir'], progress)
        with open(paths[f'{split}_ann_file'], 'w') as f:
            json.dump(coco, f)
        validate_coco_file(paths[f'{split}_ann_file'], paths[f'{split}_img_dir'])
    # Written last: a dataset interrupted half-way never looks complete.
    with open(paths['meta_file'], 'w') as f:
        json.dump(params, f, indent=2, sort_keys=True)


def _generate_split(split_code: int, num_images: int, params: dict, img_dir: str,
                    progress: Optional[ProgressBar]) -> dict:
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([params['seed'], split_code, index])
        image, instances = render_image(rng, params['width'], params['height'], params)
        file_name = f'{index:06d}.png'
        cv2.imwrite(osp.join(img_dir, file_name), image[:, :, ::-1])  # RGB -> cv2's BGR
        image_id = index + 1
        images.append(dict(id=image_id, file_name=file_name, width=params['width'],
                           height=params['height']))
        for label, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(dict(
                id=len(annotations) + 1,
                image_id=image_id,
                category_id=label + 1,
                segmentation=dict(size=rle['size'], counts=rle['counts'].decode('ascii')),
                area=float(mask_utils.area(rle)),
                bbox=[float(v) for v in mask_utils.toBbox(rle)],
                iscrowd=0))
        if progress is not None:
            progress.update()
    categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(CLASSES)]
    return dict(info=dict(description=f'synthetic shapes, seed {params["seed"]}'),
                images=images, annotations=annotations, categories=categories)


def render_image(rng: np.random.Generator, width: int, height: int,
                 params: dict) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """Draw one image.

    Args:
        rng (np.random.Generator): The image's own generator; all randomness comes from it.
        width (int): Image width.
        height (int): Image height.
        params (dict): ``num_objects``, ``object_size``, ``min_visible_fraction`` and ``min_area`` as in
            :func:`generate_synthetic_coco`.

    Returns:
        tuple: The RGB ``uint8`` image (H, W, 3) and a list of ``(label, visible_mask)`` in drawing order,
        the masks boolean (H, W) and pairwise disjoint.
    """
    canvas = _background(rng, height, width)
    owner = np.zeros((height, width), np.int32)  # index + 1 of the shape that shows at each pixel
    labels, full_areas = [], []
    for _ in range(rng.integers(params['num_objects'][0], params['num_objects'][1] + 1)):
        label = int(rng.integers(len(CLASSES)))
        mask = _place_shape(rng, label, width, height, params, owner, full_areas)
        if mask is None:
            continue
        _paint(rng, canvas, mask)
        labels.append(label)
        full_areas.append(int(mask.sum()))
        owner[mask] = len(labels)

    noise = rng.normal(0.0, rng.uniform(2.0, 8.0), canvas.shape)
    image = np.clip(canvas + noise, 0, 255).round().astype(np.uint8)
    instances = []
    for k, label in enumerate(labels):
        visible = owner == k + 1
        if visible.sum() >= params['min_area']:
            instances.append((label, visible))
    return image, instances


def _place_shape(rng: np.random.Generator, label: int, width: int, height: int, params: dict,
                 owner: np.ndarray, full_areas: List[int]) -> Optional[np.ndarray]:
    """Sample a pose for the shape that leaves every earlier shape visible enough; None if none found."""
    lo, hi = params['object_size']
    for _ in range(_PLACEMENT_TRIES):
        radius = 0.5 * min(width, height) * np.exp(rng.uniform(np.log(lo), np.log(hi)))
        center = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
        mask = _shape_mask(rng, label, center, radius, rng.uniform(0, 2 * np.pi), (height, width))
        if mask.sum() < params['min_area']:
            continue
        visible_after = np.bincount(owner[~mask], minlength=len(full_areas) + 1)[1:]
        if np.all(visible_after >= params['min_visible_fraction'] * np.asarray(full_areas)):
            return mask
    return None


def _shape_mask(rng: np.random.Generator, label: int, center: Tuple[float, float], radius: float,
                angle: float, shape: Tuple[int, int]) -> np.ndarray:
    """Boolean mask of shape ``CLASSES[label]`` whose outermost points lie on a circle of ``radius``."""
    name = CLASSES[label]
    if name == 'circle':
        polar = [(1.0, t) for t in np.linspace(0, 2 * np.pi, 64, endpoint=False)]
    elif name == 'square':
        polar = [(1.0, np.pi / 4 + k * np.pi / 2) for k in range(4)]
    elif name == 'triangle':
        polar = [(1.0, k * 2 * np.pi / 3) for k in range(3)]
    elif name == 'star':
        inner = rng.uniform(0.38, 0.5)
        polar = [(1.0 if k % 2 == 0 else inner, k * np.pi / 5) for k in range(10)]
    elif name == 'cross':
        # A plus sign: arms of half-width w reaching the circle; its 12 corners in polar form.
        w = rng.uniform(0.28, 0.38)
        reach = np.sqrt(1 - w * w)
        corners = [(reach, w), (w, w), (w, reach)]
        polar = []
        for k in range(4):
            for x, y in corners:
                polar.append((np.hypot(x, y), np.arctan2(y, x) + k * np.pi / 2))
    else:
        raise ValueError(f'no drawing for class {name!r}')
    rho = np.array([p[0] for p in polar]) * radius
    theta = np.array([p[1] for p in polar]) + angle
    points = np.stack([center[0] + rho * np.cos(theta), center[1] + rho * np.sin(theta)], axis=1)
    # Pixel (i, j) covers [j, j+1) x [i, i+1); cv2 puts pixel j at coordinate j, hence the half-pixel shift.
    fixed = np.round((points - 0.5) * (1 << _SHIFT)).astype(np.int32)
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [fixed], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask.astype(bool)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A float RGB background: a gradient, stripes or smooth blotches, all of moderate contrast."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 215, 3)
    kind = rng.integers(3)
    if kind == 0:  # linear gradient between two colours
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        other = np.clip(base + rng.uniform(-80, 80, 3), 0, 255)
        canvas = base + t[..., None] * (other - base)
    elif kind == 1:  # sinusoidal stripes at a random angle and period
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.04, 0.15) * min(height, width) + 2
        wave = np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
        canvas = base + wave[..., None] * rng.uniform(-35, 35, 3)
    else:  # low-frequency colour noise, upsampled smoothly
        cells = int(rng.integers(3, 9))
        coarse = rng.uniform(-45, 45, (cells, cells, 3)).astype(np.float32)
        canvas = base + cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(canvas, 0, 255).astype(np.float32)


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> None:
    """Fill ``mask`` on ``canvas`` with a colour that stands out from what is beneath, lightly shaded."""
    beneath = canvas[mask]
    best, best_contrast = None, -1.0
    for _ in range(8):
        colour = rng.uniform(0, 255, 3)
        # The contrast that 90% of the pixels beneath reach: the shape must stand out almost everywhere.
        contrast = float(np.percentile(np.linalg.norm(beneath - colour, axis=1), 10))
        if contrast > best_contrast:
            best, best_contrast = colour, contrast
        if contrast >= _MIN_CONTRAST:
            break
    ys, xs = np.nonzero(mask)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * (xs - xs.mean()) + np.sin(angle) * (ys - ys.mean())
    ramp = ramp / max(float(np.abs(ramp).max()), 1.0) * rng.uniform(0, 20)
    canvas[mask] = np.clip(best + ramp[:, None], 0, 255)


def _dataset_paths(out_dir: str) -> Dict[str, str]:
    root = osp.abspath(out_dir)
    paths = dict(root=root, meta_file=osp.join(root, 'meta.json'))
    for split in SPLITS:
        paths[f'{split}_img_dir'] = osp.join(root, split)
        paths[f'{split}_ann_file'] = osp.join(root, 'annotations', f'instances_{split}.json')
    return paths


def _remove_generated_files(paths: Dict[str, str]) -> None:
    """Remove what an earlier run wrote (stale images would outlive a smaller dataset); nothing else."""
    stale = [paths['meta_file']] + [paths[f'{split}_ann_file'] for split in SPLITS]
    for split in SPLITS:
        stale += glob.glob(osp.join(paths[f'{split}_img_dir'], '[0-9]' * 6 + '.png'))
    for path in stale:
        if osp.isfile(path):
            os.remove(path)


def _is_cached(paths: Dict[str, str], params: dict) -> bool:
    try:
        with open(paths['meta_file']) as f:
            if json.load(f) != params:
                return False
    except (OSError, ValueError):
        return False
    counts = dict(train=params['num_train'], val=params['num_val'])
    return all(
        osp.isfile(paths[f'{split}_ann_file'])
        and all(osp.isfile(osp.join(paths[f'{split}_img_dir'], f'{i:06d}.png')) for i in range(counts[split]))
        for split in SPLITS)


def _parse_image_size(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    sizes = [image_size] * 2 if isinstance(image_size, (int, np.integer)) else list(image_size)
    if len(sizes) != 2 or min(int(v) for v in sizes) < 16:
        raise ValueError(f'image_size must be an int or (width, height), each >= 16; got {image_size!r}')
    return int(sizes[0]), int(sizes[1])


def _check_ranges(num_objects: Sequence[int], object_size: Sequence[float],
                  min_visible_fraction: float) -> None:
    if not 1 <= num_objects[0] <= num_objects[1]:
        raise ValueError(f'num_objects must be (low, high) with 1 <= low <= high; got {num_objects!r}')
    if not 0 < object_size[0] <= object_size[1] <= 1:
        raise ValueError(f'object_size must be fractions 0 < low <= high <= 1; got {object_size!r}')
    if not 0 <= min_visible_fraction <= 1:
        raise ValueError(f'min_visible_fraction must be in [0, 1]; got {min_visible_fraction!r}')
