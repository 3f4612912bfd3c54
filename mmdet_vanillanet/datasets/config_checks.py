"""Early checks of a config's data: paths that exist, and COCO annotation files that mmdet can parse.

A typo in ``data_root`` or a broken annotation file otherwise surfaces as an error from deep inside
pycocotools or mmdet (``KeyError: 'height'``), or, worse, not at all: class names that are not categories
of the file are silently dropped, and the labels of the remaining classes shift. The tools run
:func:`check_data_config` right after reading the config, before anything is built.
"""
import json
import os.path as osp
from collections.abc import Mapping, Sequence

from mmdet.registry import DATASETS

# dataset wrappers hold their datasets under these keys
_INNER_KEYS = ('dataset', 'datasets')
_FIX_PATH = ('Fix: put the data there, or point the config at it, e.g. --cfg-options '
             '{where}.{key}=/path/to/{key} (configs that share one data_root variable: change it once).')


class DataConfigError(ValueError):
    """A dataset of the config is missing or its annotation file is malformed; the message says which, and the fix."""


class DataNotFoundError(DataConfigError, FileNotFoundError):
    """A data root, image folder or annotation file named by the config does not exist."""


def _is_remote(path, dataset_cfg):
    backend = (dataset_cfg.get('backend_args') or {}).get('backend', 'local')
    return '://' in str(path) or backend != 'local'


def _joined(data_root, path):
    """The path mmengine's BaseDataset reads: ``path`` joined to ``data_root`` unless absolute."""
    return path if osp.isabs(path) or not data_root else osp.join(data_root, path)


def _dataset_cfgs(dataset_cfg, where):
    """``(config, where)`` of the dataset and of every dataset a wrapper (Repeat, Concat, ...) holds."""
    if not isinstance(dataset_cfg, Mapping):
        return
    yield dataset_cfg, where
    for key in _INNER_KEYS:
        inner = dataset_cfg.get(key)
        if isinstance(inner, Mapping):
            yield from _dataset_cfgs(inner, f'{where}.{key}')
        elif isinstance(inner, Sequence) and not isinstance(inner, str):
            for i, item in enumerate(inner):
                yield from _dataset_cfgs(item, f'{where}.{key}[{i}]')


def _dataset_class(dataset_cfg):
    kind = dataset_cfg.get('type')
    if isinstance(kind, type):
        return kind
    try:
        return DATASETS.get(kind) if isinstance(kind, str) else None
    except KeyError:
        return None


def _parses_like_coco(cls):
    """Whether ``cls`` reads its annotation file the way mmdet's CocoDataset does (LVIS, for one, does not)."""
    from mmdet.datasets import CocoDataset
    return isinstance(cls, type) and issubclass(cls, CocoDataset) and cls.load_data_list is CocoDataset.load_data_list


def _needs_masks(dataset_cfg):
    return any(isinstance(t, Mapping) and t.get('type') == 'LoadAnnotations' and t.get('with_mask')
               for t in dataset_cfg.get('pipeline') or [])


def check_dataset_cfg(dataset_cfg, where='dataset'):
    """Check one dataset config: data root, every data prefix and the annotation file exist; COCO files parse.

    Args:
        dataset_cfg (Mapping): a dataset config (``type``, ``data_root``, ``ann_file``, ``data_prefix``, ...).
        where (str): its place in the config, for messages, e.g. ``'train_dataloader.dataset'``.

    Raises:
        DataNotFoundError: a path does not exist.
        DataConfigError: a COCO annotation file is malformed (see :func:`check_coco_annotations`).
    """
    data_root = dataset_cfg.get('data_root') or ''
    if data_root and not _is_remote(data_root, dataset_cfg) and not osp.isdir(data_root):
        raise DataNotFoundError(f'{where}.data_root {data_root!r} does not exist (absolute path: '
                                f'{osp.abspath(data_root)!r}). ' + _FIX_PATH.format(where=where, key='data_root'))
    prefixes = dataset_cfg.get('data_prefix') or {}
    for key, prefix in prefixes.items() if isinstance(prefixes, Mapping) else []:
        path = _joined(data_root, prefix) if isinstance(prefix, str) else None
        if path and not _is_remote(path, dataset_cfg) and not osp.isdir(path):
            raise DataNotFoundError(
                f'{where}.data_prefix.{key} {prefix!r} does not exist under data_root {data_root!r} (looked for '
                f'{osp.abspath(path)!r}). Fix: check the folder name, or set --cfg-options '
                f'{where}.data_prefix.{key}=FOLDER (relative to data_root).')
    ann_file = dataset_cfg.get('ann_file') or ''
    if not ann_file:
        return
    path = _joined(data_root, ann_file)
    if _is_remote(path, dataset_cfg):
        return
    if not osp.isfile(path):
        raise DataNotFoundError(f'{where}.ann_file {ann_file!r} does not exist (looked for {osp.abspath(path)!r}). '
                                + _FIX_PATH.format(where=where, key='ann_file'))
    cls = _dataset_class(dataset_cfg)
    if _parses_like_coco(cls):
        metainfo = dataset_cfg.get('metainfo') or {}
        classes = metainfo.get('classes') or cls.METAINFO.get('classes')
        check_coco_annotations(path, classes=classes, needs_masks=_needs_masks(dataset_cfg),
                               needs_annotations=not dataset_cfg.get('test_mode', False), where=f'{where}.ann_file')


def _evaluator_ann_files(evaluator_cfg, where):
    metrics = evaluator_cfg if isinstance(evaluator_cfg, Sequence) else [evaluator_cfg]
    for i, metric in enumerate(metrics):
        if isinstance(metric, Mapping) and isinstance(metric.get('ann_file'), str):
            yield metric['ann_file'], where if len(metrics) == 1 else f'{where}[{i}]'


def check_data_config(cfg, splits=('train', 'val', 'test')):
    """Check the datasets (and evaluator annotation files) of the given splits of a config, before building.

    A split is checked when the config has its ``{split}_dataloader``; validation only when it also has a
    ``val_cfg`` (mmengine builds it at the start of training).

    Args:
        cfg (Mapping): the full config.
        splits (Sequence[str]): among ``'train'``, ``'val'``, ``'test'``.
    """
    checked = set()
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not loader or (split == 'val' and not cfg.get('val_cfg')):
            continue
        for dataset_cfg, where in _dataset_cfgs(loader.get('dataset'), f'{split}_dataloader.dataset'):
            key = json.dumps(dataset_cfg, sort_keys=True, default=str)
            if key not in checked:
                checked.add(key)
                check_dataset_cfg(dataset_cfg, where)
        evaluator = cfg.get(f'{split}_evaluator')
        for ann_file, where in _evaluator_ann_files(evaluator, f'{split}_evaluator') if evaluator else []:
            if '://' not in ann_file and not osp.isfile(ann_file):
                raise DataNotFoundError(f'{where}.ann_file {ann_file!r} does not exist (absolute path: '
                                        f'{osp.abspath(ann_file)!r}). '
                                        + _FIX_PATH.format(where=where, key='ann_file'))


# ---- COCO annotation files ------------------------------------------------------------------------


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_id(value):
    return isinstance(value, int) and not isinstance(value, bool)


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


def check_coco_annotations(ann_file, classes=None, needs_masks=False, needs_annotations=True, where='ann_file'):
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
        where (str): the file's place in the config, for messages.

    Raises:
        DataConfigError: naming the file, the first problem (with the entry's index) and the fix.
    """
    def fail(problem, fix='Fix the file (or the converter that wrote it), or point the config at the right file.'):
        raise DataConfigError(f'{where} {ann_file!r} is not a valid COCO annotation file: {problem}. {fix}')

    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        fail(f'it is not JSON ({err})', 'Is it truncated, or not an annotation file? Download or write it again.')
    if not isinstance(data, Mapping):
        fail(f'the top level is a {type(data).__name__}, not an object with "images", "annotations" and '
             '"categories"')
    required = ('images', 'categories', 'annotations') if needs_annotations else ('images', 'categories')
    for key in required:
        if not isinstance(data.get(key), list):
            fail(f'"{key}" is {"missing" if key not in data else "not a list"} (top-level keys: {sorted(data)})')

    image_ids, category_ids = set(), {}
    for i, image in enumerate(data['images']):
        problem = 'is not an object' if not isinstance(image, Mapping) else _image_problem(image)
        if problem is None and image['id'] in image_ids:
            problem = f'repeats id {image["id"]}'
        if problem:
            fail(f'images[{i}] {problem}')
        image_ids.add(image['id'])
    for i, category in enumerate(data['categories']):
        if not isinstance(category, Mapping) or not _is_id(category.get('id')) \
                or not isinstance(category.get('name'), str):
            fail(f'categories[{i}] needs an integer "id" and a string "name", got {category!r}')
        category_ids[category['id']] = category['name']
    ann_ids = set()
    for i, ann in enumerate(data.get('annotations') or []):
        problem = 'is not an object' if not isinstance(ann, Mapping) else \
            _annotation_problem(ann, image_ids, category_ids, needs_masks)
        if problem is None and ann['id'] in ann_ids:
            problem = f'repeats id {ann["id"]}'
        if problem:
            fail(f'annotations[{i}] {problem}')
        ann_ids.add(ann['id'])

    names = set(category_ids.values())
    missing = [c for c in classes or () if c not in names]
    if missing:
        fail(f'the classes {missing} of the config are not category names of the file, whose categories are '
             f'{sorted(names)[:20]}; mmdet would silently drop them and shift the labels of the others',
             'Fix: spell the classes as the file does (metainfo=dict(classes=...) in the dataset config), or use '
             'the annotation file of these classes.')
