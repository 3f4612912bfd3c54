"""tools/visualize_cam.py and mmdet_vanillanet.visualization: Grad-CAM++ maps of detectors."""
import glob
import os
import os.path as osp
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image
from tiny_detector import demo_retrained, load_tool

from mmdet.models.backbones import ResNet
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules

from mmdet_vanillanet.datasets import generate_synthetic_coco, synthetic_coco_metainfo
from mmdet_vanillanet.visualization import (
    backbone_output_layers,
    box_contrast,
    detection_cam,
    load_detector,
    resolve_layer,
    save_cam_figure,
)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_CONFIG = osp.join(ROOT, 'configs', 'demo', 'retinanet_vanillanet_demo.py')
TOOL = osp.join(ROOT, 'tools', 'visualize_cam.py')

_SMALL_TEST_PIPELINE = """
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(96, 96), keep_ratio=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
"""
# Small detectors of the other supported kinds, and one unsupported (CenterNet), on the same tiny VanillaNet
# (blocks 0, 1, 2: widths 32/48/64 at strides 8/16/32).
TINY_BACKBONE = "_delete_=True, type='VanillaNet', arch=dict(dims=[16, 32, 48, 64], strides=[2, 2, 2]), act_num=1"
FCOS_CONFIG = f"""
_base_ = 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'
custom_imports = dict(imports=['mmdet_vanillanet'], allow_failed_imports=False)
model = dict(
    backbone=dict({TINY_BACKBONE}, out_indices=(0, 1, 2)),
    neck=dict(in_channels=[32, 48, 64], out_channels=16, start_level=0, num_outs=3),
    bbox_head=dict(num_classes=5, in_channels=16, feat_channels=16, stacked_convs=1, strides=[8, 16, 32],
                   norm_cfg=None),
    test_cfg=dict(score_thr=0.0))
""" + _SMALL_TEST_PIPELINE
FASTER_RCNN_CONFIG = f"""
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_vanillanet'], allow_failed_imports=False)
model = dict(
    backbone=dict({TINY_BACKBONE}, out_indices=(0, 1, 2)),
    neck=dict(in_channels=[32, 48, 64], out_channels=16, num_outs=3),
    rpn_head=dict(in_channels=16, feat_channels=16, anchor_generator=dict(strides=[8, 16, 32])),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=16, featmap_strides=[8, 16, 32]),
                  bbox_head=dict(in_channels=16, fc_out_channels=32, num_classes=5)),
    test_cfg=dict(rcnn=dict(score_thr=0.0)))
""" + _SMALL_TEST_PIPELINE
CENTERNET_CONFIG = f"""
_base_ = 'mmdet::centernet/centernet_r18_8xb16-crop512-140e_coco.py'
custom_imports = dict(imports=['mmdet_vanillanet'], allow_failed_imports=False)
model = dict(
    backbone=dict({TINY_BACKBONE}, out_indices=(2,)),
    neck=None,
    bbox_head=dict(num_classes=5, in_channels=64, feat_channels=16))
"""


def write_checkpoint(config, path):
    """An untrained detector (torch's default init: scores near 0.5, so it detects something)."""
    register_all_modules()
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(config).model)
    torch.save({'state_dict': model.state_dict(), 'meta': {'dataset_meta': synthetic_coco_metainfo()}}, path)
    return str(path)


def write_config(tmp_path, text, name):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture(scope='module')
def val_images(tmp_path_factory):
    root = tmp_path_factory.mktemp('cam_data')
    paths = generate_synthetic_coco(str(root), num_train=0, num_val=2, image_size=(96, 80), show_progress=False)
    return sorted(glob.glob(osp.join(paths['val_img_dir'], '*.png')))


@pytest.fixture(scope='module')
def demo_detector(tmp_path_factory):
    checkpoint = write_checkpoint(DEMO_CONFIG, tmp_path_factory.mktemp('cam_demo') / 'demo.pth')
    return checkpoint, load_detector(DEMO_CONFIG, checkpoint)


def test_tool_writes_one_png_per_image_side_by_side(tmp_path, capsys, val_images, demo_detector):
    checkpoint, _ = demo_detector
    fcos = write_config(tmp_path, FCOS_CONFIG, 'fcos_tiny.py')
    fcos_checkpoint = write_checkpoint(fcos, tmp_path / 'fcos.pth')
    out_dir = tmp_path / 'cams'
    load_tool('visualize_cam').main([DEMO_CONFIG, checkpoint, *val_images, '--out-dir', str(out_dir),
                                     '--score-thr', '0', '--compare', fcos, fcos_checkpoint,
                                     '--compare-layer', 'backbone.stages.1'])
    written = sorted(out_dir.glob('*.png'))
    assert [p.name for p in written] == ['000000.png', '000001.png']
    assert 'detection(s) at backbone.stages.2, 5 detection(s) at backbone.stages.1' in capsys.readouterr().out
    width, height = Image.open(written[0]).size
    assert width > 1.6 * height  # two panels of a 96x80 image next to each other


def test_detection_cam_maps_the_top_detections_onto_the_image(val_images, demo_detector):
    _, model = demo_detector
    result = detection_cam(model, val_images[0], top_k=3, score_thr=0.0)
    assert result.layer == 'backbone.stages.2' and result.image.shape == (80, 96, 3)
    assert result.cam.shape == (80, 96) and result.cam.dtype == np.float32
    assert 0.0 <= result.cam.min() and result.cam.max() <= 1.0
    assert result.bboxes.shape == (3, 4) and np.all(np.diff(result.scores) <= 0)
    assert result.class_names == synthetic_coco_metainfo()['classes']
    assert detection_cam(model, val_images[0], layer=0, top_k=1, score_thr=0.0).layer == 'backbone.stages.0'


def test_nothing_detected_still_draws_the_image(tmp_path, val_images, demo_detector):
    _, model = demo_detector
    result = detection_cam(model, val_images[0], score_thr=1.0)
    assert result.cam is None and len(result.scores) == 0 and result.bboxes.shape == (0, 4)
    save_cam_figure([result], str(tmp_path / 'none' / 'a.png'), titles=['demo'])
    assert (tmp_path / 'none' / 'a.png').is_file()


def test_two_stage_detectors_are_explained_too(tmp_path, val_images):
    config = write_config(tmp_path, FASTER_RCNN_CONFIG, 'faster_rcnn_tiny.py')
    model = load_detector(config, write_checkpoint(config, tmp_path / 'frcnn.pth'))
    result = detection_cam(model, val_images[1], layer=-1, top_k=2, score_thr=0.0)
    assert result.cam is not None and result.cam.shape == (80, 96) and len(result.scores) == 2


def test_backbone_outputs_of_vanillanet_and_resnet(demo_detector):
    _, model = demo_detector
    assert backbone_output_layers(model) == ['backbone.stages.0', 'backbone.stages.1', 'backbone.stages.2']
    resnet = types.SimpleNamespace(backbone=ResNet(depth=18, out_indices=(1, 2, 3)))
    assert backbone_output_layers(resnet) == ['backbone.layer2', 'backbone.layer3', 'backbone.layer4']
    assert resolve_layer(model, 'stages.1') == resolve_layer(model, '-2') == 'backbone.stages.1'


def test_clear_errors(tmp_path, val_images, demo_detector):
    checkpoint, model = demo_detector
    tool = load_tool('visualize_cam')
    with pytest.raises(FileNotFoundError, match='Image.*not found: .*missing.png'):
        tool.main([DEMO_CONFIG, checkpoint, val_images[0], str(tmp_path / 'missing.png'),
                   '--out-dir', str(tmp_path / 'out')])
    with pytest.raises(ValueError, match=r"No module named 'stages.9'.*Backbone outputs: backbone.stages.0, "
                                         r"backbone.stages.1, backbone.stages.2.*Closest names: backbone.stages"):
        tool.main([DEMO_CONFIG, checkpoint, val_images[0], '--out-dir', str(tmp_path / 'out'),
                   '--layer', 'stages.9'])
    assert not (tmp_path / 'out').exists()
    with pytest.raises(ValueError, match='index 3 is out of range: the backbone returns 3 outputs'):
        detection_cam(model, val_images[0], layer=3)
    with pytest.raises(ValueError, match='bbox_head.retina_cls did not run while the detector extracted features'):
        detection_cam(model, val_images[0], layer='bbox_head.retina_cls', score_thr=0.0)
    with pytest.raises(FileNotFoundError, match='Checkpoint .*nope.pth'):
        load_detector(DEMO_CONFIG, str(tmp_path / 'nope.pth'))
    fcos = write_config(tmp_path, FCOS_CONFIG, 'fcos_tiny.py')
    with pytest.raises(ValueError, match=r'(?s)demo.pth does not fit the detector of .*fcos_tiny.py: .*mismatch'):
        load_detector(fcos, checkpoint)
    centernet = load_detector(write_config(tmp_path, CENTERNET_CONFIG, 'centernet_tiny.py'), None)
    with pytest.raises(NotImplementedError, match='not supported for CenterNet with CenterNetHead. Supported: '
                                                  'single-stage'):
        detection_cam(centernet, val_images[0])


def test_an_error_while_loading_is_not_called_a_misfit(demo_detector, monkeypatch):
    """Only weights that do not fit are reported as such; running out of memory while loading says so.

    (An out-of-memory error cannot be caused for real on a CPU test machine: loading is made to raise it.)
    """
    checkpoint, _ = demo_detector

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')

    monkeypatch.setattr(torch.nn.Module, '_load_from_state_dict', out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match='CUDA out of memory'):
        load_detector(DEMO_CONFIG, checkpoint)


def test_box_contrast():
    cam = np.zeros((10, 20), dtype=np.float32)
    cam[2:5, 4:8] = 1.0
    assert box_contrast(cam, [4, 2, 8, 5]) == (1.0, 0.0)
    assert box_contrast(cam, [0, 0, 20, 10])[1] != box_contrast(cam, [0, 0, 20, 10])[1]  # nan: no outside


# The demo detector as it is (256 x 256 images), trained briefly on a small set of larger, fewer shapes.
TRAIN_CONFIG = """
_base_ = {demo!r}
data_root = {data_root!r}
max_epochs = 12
train_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root))
""" + demo_retrained(warmup_iters=50, log_interval=25)


@pytest.mark.slow
def test_cam_of_a_trained_detector_lies_on_its_detections(tmp_path):
    """About 3 minutes on 2 busy cores, nearly all of it training (300 iterations)."""
    data_root = str(tmp_path / 'data') + '/'
    generate_synthetic_coco(data_root, num_train=200, num_val=12, image_size=256, num_objects=(1, 3),
                            object_size=(0.25, 0.5), show_progress=False)
    config = write_config(tmp_path, TRAIN_CONFIG.format(demo=DEMO_CONFIG, data_root=data_root), 'demo_brief.py')
    work_dir = tmp_path / 'work'
    # One thread: on a shared 2-core machine, two torch threads per process make training several times slower.
    env = dict(os.environ, OMP_NUM_THREADS='1')
    train = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'train.py'), config, '--work-dir', str(work_dir)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert train.returncode == 0, train.stderr[-3000:]
    checkpoint = str(work_dir / 'epoch_12.pth')
    images = sorted(glob.glob(data_root + 'val/*.png'))

    out_dir = tmp_path / 'cams'
    tool = subprocess.run([sys.executable, TOOL, config, checkpoint, *images, '--out-dir', str(out_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert tool.returncode == 0, tool.stderr[-3000:]
    assert sorted(p.name for p in out_dir.glob('*.png')) == [osp.basename(p) for p in images]

    # The map explaining the top detection is brighter inside its box than outside, on most images.
    model = load_detector(config, checkpoint)
    contrasts = []
    for image in images:
        result = detection_cam(model, image, top_k=1, score_thr=0.05)
        assert result.cam is not None, f'nothing detected on {image}: the detector did not train'
        contrasts.append(box_contrast(result.cam, result.bboxes[0]))
    brighter = sum(inside > outside for inside, outside in contrasts)
    print(f'CAM brighter inside the top box on {brighter}/{len(images)} images (inside/outside): '
          + ', '.join(f'{inside:.2f}/{outside:.2f}' for inside, outside in contrasts))
    assert brighter >= 0.75 * len(images)
