"""The synthetic shapes dataset: loads in pycocotools, is reproducible, and its masks are right."""
import contextlib
import filecmp
import io
import json
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from mmdet_vanillanet.datasets import CLASSES, generate_synthetic_coco, synthetic_coco_metainfo, validate_coco_file

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = dict(num_train=8, num_val=4, image_size=64, show_progress=False)


def load(ann_file):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(ann_file)


def dataset_files(root):
    return sorted(osp.relpath(osp.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return generate_synthetic_coco(str(tmp_path_factory.mktemp('seed0')), seed=0, **TINY)


@pytest.fixture(scope='module')
def crowded(tmp_path_factory):
    """Large shapes, many per image: occlusion is bound to happen."""
    return generate_synthetic_coco(str(tmp_path_factory.mktemp('crowded')), num_objects=(5, 6),
                                   object_size=(0.4, 0.6), seed=1, **TINY)


def test_both_splits_load_in_pycocotools(tiny):
    for split, num_images in (('train', 8), ('val', 4)):
        coco = load(tiny[f'{split}_ann_file'])
        assert len(coco.getImgIds()) == num_images
        assert [coco.cats[i]['name'] for i in sorted(coco.getCatIds())] == list(CLASSES)
        for img_id, img in coco.imgs.items():
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            assert 1 <= len(anns) <= 6
            assert all(a['iscrowd'] == 0 and a['area'] > 0 for a in anns)
            image = cv2.imread(osp.join(tiny[f'{split}_img_dir'], img['file_name']))
            assert image.shape == (img['height'], img['width'], 3) == (64, 64, 3)


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    again = generate_synthetic_coco(str(tmp_path / 'again'), seed=0, **TINY)
    other = generate_synthetic_coco(str(tmp_path / 'other'), seed=1, **TINY)
    files = dataset_files(tiny['root'])
    assert files == dataset_files(again['root'])
    match, mismatch, errors = filecmp.cmpfiles(tiny['root'], again['root'], files, shallow=False)
    assert mismatch == [] and errors == []
    _, mismatch, _ = filecmp.cmpfiles(tiny['root'], other['root'],
                                      [f for f in files if f.endswith('.png')], shallow=False)
    assert len(mismatch) == 12
    assert not filecmp.cmp(tiny['train_ann_file'], other['train_ann_file'], shallow=False)


def test_train_and_val_images_differ(tiny):
    def pixels(split):
        folder = tiny[f'{split}_img_dir']
        return {cv2.imread(osp.join(folder, f)).tobytes() for f in os.listdir(folder)}

    train, val = pixels('train'), pixels('val')
    assert len(train) == 8 and len(val) == 4 and not train & val


def test_bbox_and_area_come_from_the_visible_mask(tiny, crowded):
    for paths in (tiny, crowded):
        for split in ('train', 'val'):
            coco = load(paths[f'{split}_ann_file'])
            for ann in coco.dataset['annotations']:
                ys, xs = np.nonzero(coco.annToMask(ann))
                x0, y0 = xs.min(), ys.min()
                assert ann['bbox'] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
                assert ann['area'] == len(xs)


def test_occluded_masks_are_disjoint(crowded):
    occlusions = 0
    for split in ('train', 'val'):
        coco = load(crowded[f'{split}_ann_file'])
        for img_id in coco.getImgIds():
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            coverage = sum(coco.annToMask(a).astype(int) for a in anns)
            assert coverage.max() == 1
            boxes = [a['bbox'] for a in anns]
            occlusions += sum(_boxes_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[:i])
    assert occlusions > 0, 'crowded images should contain overlapping shapes'


def _boxes_overlap(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_all_classes_and_sizes_appear(tmp_path):
    paths = generate_synthetic_coco(str(tmp_path), num_train=30, num_val=1, image_size=(96, 64),
                                    show_progress=False)
    coco = load(paths['train_ann_file'])
    assert coco.imgs[1]['width'] == 96 and coco.imgs[1]['height'] == 64
    anns = coco.dataset['annotations']
    assert {a['category_id'] for a in anns} == set(range(1, len(CLASSES) + 1))
    sides = [max(a['bbox'][2:]) for a in anns]
    assert min(sides) < 16 and max(sides) > 20


def test_existing_dataset_is_reused_unless_forced_or_changed(tiny):
    stamp = os.stat(tiny['train_ann_file']).st_mtime_ns
    generate_synthetic_coco(tiny['root'], seed=0, **TINY)
    assert os.stat(tiny['train_ann_file']).st_mtime_ns == stamp
    keep = osp.join(tiny['train_img_dir'], 'notes.txt')
    with open(keep, 'w') as f:
        f.write('not ours')
    generate_synthetic_coco(tiny['root'], seed=0, force=True, **TINY)
    assert os.stat(tiny['train_ann_file']).st_mtime_ns != stamp
    assert osp.isfile(keep)
    os.remove(keep)
    fewer = generate_synthetic_coco(tiny['root'], seed=0, **dict(TINY, num_train=3))
    assert sorted(os.listdir(fewer['train_img_dir'])) == ['000000.png', '000001.png', '000002.png']
    generate_synthetic_coco(tiny['root'], seed=0, **TINY)  # leave the shared fixture as it was


def test_validation_names_the_problem(tiny, tmp_path):
    with open(tiny['val_ann_file']) as f:
        coco = json.load(f)
    coco['annotations'][0]['bbox'][2] += 1
    broken = tmp_path / 'broken.json'
    broken.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match='bbox'):
        validate_coco_file(str(broken), tiny['val_img_dir'])
    with pytest.raises(ValueError, match='missing'):
        validate_coco_file(tiny['val_ann_file'], str(tmp_path))


def test_metainfo():
    meta = synthetic_coco_metainfo()
    assert meta['classes'] == CLASSES
    assert len(meta['palette']) == len(CLASSES)


def test_tool_writes_a_tiny_dataset(tmp_path):
    out = tmp_path / 'tool'
    result = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'make_synthetic_coco.py'), str(out), '--num-train', '3',
         '--num-val', '2', '--image-size', '48', '--seed', '3'],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '5/5' in result.stdout  # mmengine's progress bar
    assert 'train: 3 images' in result.stdout and 'val: 2 images' in result.stdout
    assert len(load(str(out / 'annotations' / 'instances_val.json')).getImgIds()) == 2
