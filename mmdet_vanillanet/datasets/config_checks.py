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

from .coco_file_checks import check_coco_annotations
from .errors import DataConfigError, DataNotFoundError

# the errors are the ones callers catch: they stay importable from here
__all__ = ['DataConfigError', 'DataNotFoundError', 'check_data_config', 'check_dataset_cfg']

# dataset wrappers hold their datasets under these keys
_INNER_KEYS = ('dataset', 'datasets')
_FIX_PATH = ('Fix: put the data there, or point the config at it, e.g. --cfg-options '
             '{where}.{key}=/path/to/{key} (configs that share one data_root variable: change it once).')


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
        DataConfigError: a COCO annotation file is malformed (see
            :func:`~mmdet_vanillanet.datasets.coco_file_checks.check_coco_annotations`).
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
