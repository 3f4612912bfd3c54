"""Checks of COCO annotation files: what mmdet's CocoDataset reads, and that a generated file matches its images.

Both raise :class:`~mmdet_vanillanet.datasets.errors.DataConfigError` (a ``ValueError``) naming the file, the
first problem (with the entry's index) and the fix.
"""
import contextlib
import io
import json
import os.path as osp
from collections.abc import Mapping
from functools import partial

import cv2
import numpy as np
from pycocotools.coco import COCO

from .errors import DataConfigError

FIX_FILE = 'Fix the file (or the converter that wrote it), or point the config at the right file.'
FIX_GENERATED = 'Regenerate the dataset with force=True.'
_FIX_JSON = 'Is it truncated, or not an annotation file? Download or write it again.'
_FIX_CLASSES = ('Fix: spell the classes as the file does (metainfo=dict(classes=...) in the dataset config), or use '
                'the annotation file of these classes.')


def _invalid(ann_file, where, problem, fix):
    return DataConfigError(f'{where} {ann_file!r} is not a valid COCO annotation file: {problem}. {fix}')


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_id(value):
    return isinstance(value, int) and not isinstance(value, bool)


# ---- what mmdet's CocoDataset reads ---------------------------------------------------------------


def _read_json(ann_file, where):
    try:
        with open(ann_file) as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _invalid(ann_file, where, f'it is not JSON ({err})', _FIX_JSON)


def _top_level_problem(data, needs_annotations):
    if not isinstance(data, Mapping):
        return (f'the top level is a {type(data).__name__}, not an object with "images", "annotations" and '
                '"categories"')
    required = ('images', 'categories', 'annotations') if needs_annotations else ('images', 'categories')
    for key in required:
        if not isinstance(data.get(key), list):
            return f'"{key}" is {"missing" if key not in data else "not a list"} (top-level keys: {sorted(data)})'
    return None


def _segmentation_problem(segmentation):
    if isinstance(segmentation, Mapping):
        return None if {'counts', 'size'} <= set(segmentation) else 'an RLE dict needs "counts" and "size"'
    if isinstance(segmentation, list) and segmentation:
        if all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(_is_number, p))
               for p in segmentation):
            return None
        return 'polygons must be lists of at least 3 (x, y) number pairs'
    return 'needs polygons (a list of [x1, y1, x2, y2, ...]) or an RLE dict'


def _image_problem(image):
    if not _is_id(image.get('id')):
        return '"id" must be an integer'
    if not isinstance(image.get('file_name'), str) or not image['file_name']:
        return 'needs a "file_name"'
    for key in ('height', 'width'):
        if not _is_id(image.get(key)) or image[key] < 1:
            return f'"{key}" must be a positive integer, got {image.get(key)!r}'
    return None


def _annotation_problem(ann, image_ids, category_ids, needs_masks):
    if not _is_id(ann.get('id')):
        return '"id" must be an integer'
    if ann.get('image_id') not in image_ids:
        return f'"image_id" {ann.get("image_id")!r} is not the id of an image in "images"'
    if ann.get('category_id') not in category_ids:
        return f'"category_id" {ann.get("category_id")!r} is not the id of a category in "categories"'
    bbox = ann.get('bbox')
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
        return f'"bbox" must be [x, y, width, height] (4 numbers), got {bbox!r}'
    if bbox[2] < 0 or bbox[3] < 0:
        return f'"bbox" {bbox} has a negative width or height (COCO boxes are [x, y, width, height])'
    if not _is_number(ann.get('area')):
        return f'"area" must be a number, got {ann.get("area")!r}'
    if needs_masks and not ann.get('iscrowd'):
        problem = _segmentation_problem(ann.get('segmentation'))
        if problem:
            return f'"segmentation" (the pipeline loads masks): {problem}'
    return None


def _entries_problem(entries, key, entry_problem):
    """The first entry of ``images`` or ``annotations`` that is no object, fails ``entry_problem`` or repeats an id."""
    ids = set()
    for i, entry in enumerate(entries):
        problem = 'is not an object' if not isinstance(entry, Mapping) else entry_problem(entry)
        if problem is None and entry['id'] in ids:
            problem = f'repeats id {entry["id"]}'
        if problem:
            return f'{key}[{i}] {problem}'
        ids.add(entry['id'])
    return None


def _categories_problem(categories):
    for i, category in enumerate(categories):
        if not isinstance(category, Mapping) or not _is_id(category.get('id')) \
                or not isinstance(category.get('name'), str):
            return f'categories[{i}] needs an integer "id" and a string "name", got {category!r}'
    return None


def _structure_problem(data, needs_masks, needs_annotations):
    """The first problem of a loaded COCO file, in the order: top level, images, categories, annotations."""
    problem = (_top_level_problem(data, needs_annotations)
               or _entries_problem(data['images'], 'images', _image_problem)
               or _categories_problem(data['categories']))
    if problem:
        return problem
    annotation_problem = partial(_annotation_problem, image_ids={image['id'] for image in data['images']},
                                 category_ids={category['id'] for category in data['categories']},
                                 needs_masks=needs_masks)
    return _entries_problem(data.get('annotations') or [], 'annotations', annotation_problem)


def check_coco_annotations(ann_file, classes=None, needs_masks=False, needs_annotations=True, where='ann_file',
                           fix=FIX_FILE):
    """Check that a COCO annotation file holds what mmdet's CocoDataset reads, with the types it expects.

    Checked: the top-level lists; every image's ``id``, ``file_name``, ``height``, ``width``; every
    category's ``id`` and ``name``; every annotation's ``id``, ``image_id`` and ``category_id`` (pointing at
    an image and a category), ``bbox`` (4 numbers, no negative size), ``area`` and, when masks are loaded,
    ``segmentation``; unique ids; and that every class of the config is a category name of the file.

    Args:
        ann_file (str): path of the json file.
        classes (Sequence[str] | None): the class names the dataset will look up; None skips that check.
        needs_masks (bool): the pipeline loads masks. Default: False.
        needs_annotations (bool): an ``annotations`` list is required (training); test files may lack it.
            Default: True.
        where (str): the file's place in the config, for messages. Default: 'ann_file'.
        fix (str): the advice that ends the message of a malformed entry. Default: :data:`FIX_FILE`.

    Returns:
        dict: the file's content.

    Raises:
        DataConfigError: naming the file, the first problem (with the entry's index) and the fix.
    """
    data = _read_json(ann_file, where)
    problem = _structure_problem(data, needs_masks, needs_annotations)
    if problem:
        raise _invalid(ann_file, where, problem, fix)
    names_by_id = {category['id']: category['name'] for category in data['categories']}
    names = set(names_by_id.values())
    missing = [c for c in classes or () if c not in names]
    if missing:
        raise _invalid(ann_file, where, f'the classes {missing} of the config are not category names of the file, '
                       f'whose categories are {sorted(names)[:20]}; mmdet would silently drop them and shift the '
                       'labels of the others', _FIX_CLASSES)
    return data


# ---- a generated file against its images -----------------------------------------------------------


def _image_files_problem(images, img_dir):
    for i, image in enumerate(images):
        path = osp.join(img_dir, image['file_name'])
        if not osp.isfile(path):
            return f'images[{i}] {path} is missing'
        height, width = cv2.imread(path, cv2.IMREAD_UNCHANGED).shape[:2]
        if (height, width) != (image['height'], image['width']):
            return f'images[{i}] {path} is {width}x{height}, the file says {image["width"]}x{image["height"]}'
    return None


def _mask_bbox(mask):
    """``[x, y, w, h]`` of the smallest box around the (non-empty) mask's pixels."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _masks_problem(data):
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    for i, ann in enumerate(data.get('annotations') or []):
        mask = coco.annToMask(ann)
        pixels = int(mask.sum())
        if pixels != ann['area']:
            return f'annotations[{i}] "area" is {ann["area"]} but its mask has {pixels} pixels'
        if not pixels:
            return f'annotations[{i}] has an empty mask'
        if _mask_bbox(mask) != [float(v) for v in ann['bbox']]:
            return f'annotations[{i}] "bbox" {ann["bbox"]} is not its mask\'s extent {_mask_bbox(mask)}'
    return None


def validate_coco_file(ann_file: str, img_dir: str) -> None:
    """Check a generated COCO instance file (:func:`check_coco_annotations`, masks included) against its images.

    Also checks that it has categories, that every image file exists with the recorded size, and that every
    annotation's mask decodes to exactly its ``area`` (at least one pixel) and ``bbox``, as the files
    :func:`~mmdet_vanillanet.datasets.generate_synthetic_coco` writes do.

    Args:
        ann_file (str): Path of the COCO json.
        img_dir (str): Folder the images' ``file_name`` are relative to.

    Raises:
        DataConfigError: A ``ValueError`` naming the file, the first problem found and the fix (regenerate).
    """
    data = check_coco_annotations(ann_file, needs_masks=True, needs_annotations=False, fix=FIX_GENERATED)
    problem = ((None if data['categories'] else 'it has no categories')
               or _image_files_problem(data['images'], img_dir) or _masks_problem(data))
    if problem:
        raise _invalid(ann_file, 'ann_file', problem, FIX_GENERATED)
