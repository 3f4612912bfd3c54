"""Bad input gets one clear, early message through the user's entry points; odd inputs just work.

Entry points: ``MODELS.build`` (and ``init_weights``) of a config's detector, and the tools' ``main(argv)``
called in this process (one test runs a tool as a subprocess to show what the terminal shows). Every test
asserts on the message, and that it was not raised from inside torch.
"""
import json
import os.path as osp
import subprocess
import sys

import cv2
import pytest
import torch
from mmengine.config import Config
from tiny_detector import ROOT, load_tool, make_data, tool_env, write_config

from mmdet.registry import MODELS

import mmdet_vanillanet  # noqa: F401  (registration, safe loader)
from mmdet_vanillanet.checkpoint import CheckpointNotFoundError, CheckpointReadError, VanillaNetWeightsError
from mmdet_vanillanet.datasets.config_checks import DataConfigError, DataNotFoundError
from mmdet_vanillanet.models import VanillaNet

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad_inputs')
    data = make_data(root / 'data')
    return root, data, write_config(root / 'tiny.py', data, max_epochs=1)


def raises(kind, *phrases):
    """``pytest.raises`` that also checks the message holds every phrase, and that torch did not raise it."""

    class Check:

        def __enter__(self):
            self.context = pytest.raises(kind)
            self.info = self.context.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.context.__exit__(*exc)
            message = str(self.info.value)
            for phrase in phrases:
                assert phrase in message, f'{phrase!r} not in the message:\n{message}'
            origin = str(self.info.traceback[-1].path)
            assert f'{osp.sep}torch{osp.sep}' not in origin, f'raised inside torch ({origin}): {message}'
            return handled

    return Check()


def detector_cfg(config, **backbone):
    cfg = Config.fromfile(config)
    cfg.model.backbone.update(backbone)
    return cfg.model


def tool(name, *args):
    return load_tool(name).main([str(a) for a in args])


# ---- the backbone's arguments, through MODELS.build of the detector ------------------------------------


@pytest.mark.parametrize('backbone, kind, phrases', [
    (dict(arch='vanillanet_14'), ValueError,
     ["Unknown VanillaNet arch 'vanillanet_14'", 'valid names: vanillanet_5, ']),
    (dict(arch=dict(dims=[8, 16], strides=[2], stride=[2])), ValueError,
     ["Unknown keys ['stride'] in VanillaNet arch"]),
    (dict(norm_cfg=None), TypeError, ["norm_cfg must be a dict such as dict(type='BN', eps=1e-6), got None"]),
    (dict(act_num=None), TypeError, ['act_num must be an integer >= 1', 'got None']),
    (dict(act_num=float('nan')), ValueError, ['act_num must be an integer >= 1', 'got nan']),
    (dict(out_indices=(0, 3)), ValueError, ['out_indices must be strictly increasing block indices in [0, 2]',
                                            '(3 blocks), got (0, 3)']),
    (dict(frozen_stages=4), ValueError, ['frozen_stages must be an int in [-1, 3]', 'got 4']),
    (dict(act_num=0), ValueError, ['act_num must be an integer >= 1', 'got 0']),
])
def test_backbone_arguments(setup, backbone, kind, phrases):
    with raises(kind, *phrases) as error:
        MODELS.build(detector_cfg(setup[2], **backbone))
    assert type(error.value) is kind and str(error.value).startswith(phrases[0][:12]), 'wrapped or quoted'


def test_a_tool_shows_the_message_last(setup, tmp_path):
    """What the terminal shows: the traceback ends with the message, not inside torch."""
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'train.py'), setup[2], '--work-dir',
                             str(tmp_path), '--cfg-options', 'model.backbone.act_num=0'],
                            cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('ValueError: ') and 'act_num must be an integer >= 1' in last, result.stderr[-2000:]
    assert f'{osp.sep}torch{osp.sep}' not in result.stderr


# ---- checkpoints --------------------------------------------------------------------------------------


def save_detector(config, path, **backbone):
    """A detector checkpoint as mmengine writes it, of the config's detector with other backbone settings."""
    model = MODELS.build(detector_cfg(config, **backbone))
    torch.save(dict(state_dict=model.state_dict(), meta=dict(epoch=1, iter=4)), path)
    return str(path)


def save_backbone(config, path, **backbone):
    """Backbone weights in the published key layout (what init_cfg Pretrained reads)."""
    cfg = detector_cfg(config, **backbone).backbone
    cfg.pop('type')
    torch.save(dict(model=VanillaNet(**cfg).state_dict()), path)
    return str(path)


def with_pretrained(config, path, **backbone):
    return detector_cfg(config, init_cfg=dict(type='Pretrained', checkpoint=str(path)), **backbone)


def test_missing_checkpoints(setup, tmp_path):
    root, _, config = setup
    missing = tmp_path / 'epoch_12.pth'
    with raises(CheckpointNotFoundError, f"Checkpoint '{missing}' does not exist", 'Fix: give the path'):
        tool('test', config, missing, '--work-dir', tmp_path)
    with raises(CheckpointNotFoundError, f"Checkpoint '{missing}' does not exist"):
        tool('train', config, '--resume', missing, '--work-dir', tmp_path)
    with raises(CheckpointNotFoundError, f"Checkpoint '{missing}' does not exist"):
        tool('train', config, '--work-dir', tmp_path, '--cfg-options', f'load_from={missing}')
    model = MODELS.build(with_pretrained(config, missing))  # building reads no weights
    with raises(FileNotFoundError, f"VanillaNet init_cfg checkpoint '{missing}' does not exist",
                'model.backbone.init_cfg.checkpoint=/path/to/'):
        model.init_weights()
    # training from ImageNet weights: before any data is read (the data root is missing too)
    with raises(FileNotFoundError, f"VanillaNet init_cfg checkpoint '{missing}' does not exist",
                'model.backbone.init_cfg.checkpoint=/path/to/'):
        tool('train', config, '--work-dir', tmp_path, '--cfg-options', 'model.backbone.init_cfg.type=Pretrained',
             f'model.backbone.init_cfg.checkpoint={missing}', f'train_dataloader.dataset.data_root={tmp_path}/none')


def test_files_that_are_not_checkpoints(setup, tmp_path):
    root, _, config = setup
    page = tmp_path / 'vanillanet_13.pth'
    page.write_text('<!DOCTYPE html><html>404 Not Found</html>')
    with raises(CheckpointReadError, 'is not a PyTorch checkpoint', "starts with b'<!DOCTYPE html><'",
                'download it again'):
        tool('test', config, page, '--work-dir', tmp_path)
    whole = open(save_detector(config, tmp_path / 'whole.pth'), 'rb').read()
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(whole[:len(whole) // 2])
    with raises(CheckpointReadError, f"Checkpoint '{cut}' is truncated or corrupted"):
        tool('test', config, cut, '--work-dir', tmp_path)
    with raises(CheckpointReadError, f"Checkpoint '{cut}' is truncated or corrupted"):
        tool('train', config, '--resume', cut, '--work-dir', tmp_path)


@pytest.mark.parametrize('backbone, phrases', [
    (dict(act_num=2), ['checkpoint has 5x5 activation kernels (act_num=2), the model has act_num=1']),
    (dict(arch=dict(dims=[8, 16, 24, 32, 32], strides=[2, 2, 2, 1])),
     ['checkpoint has 4 blocks (dims 8, 16, 24, 32, 32), the model dims 8, 16, 24, 32 (3 blocks)']),
    (dict(deploy=True), ['this is a deploy-structure checkpoint; set deploy=True']),
])
def test_backbone_weights_of_another_network(setup, tmp_path, backbone, phrases):
    config = setup[2]
    weights = save_backbone(config, tmp_path / 'imagenet.pth', **backbone)
    model = MODELS.build(with_pretrained(config, weights))
    with raises(VanillaNetWeightsError, f'Cannot load VanillaNet weights from {weights}', *phrases):
        model.init_weights()


def test_training_weights_into_a_deploy_backbone(setup, tmp_path):
    config = setup[2]
    weights = save_backbone(config, tmp_path / 'imagenet.pth')
    model = MODELS.build(with_pretrained(config, weights, deploy=True))
    with raises(VanillaNetWeightsError, 'this is a training-structure checkpoint and the model has deploy=True',
                'tools/convert_weights.py --deploy'):
        model.init_weights()


@pytest.mark.parametrize('backbone, phrase', [
    (dict(act_num=2), 'checkpoint has 5x5 activation kernels (act_num=2), the model has act_num=1'),
    (dict(deploy=True), 'this is a deploy-structure checkpoint; set deploy=True'),
])
def test_test_tool_refuses_a_detector_checkpoint_of_another_backbone(setup, tmp_path, backbone, phrase):
    """The cause in words (act_num, deploy structure), not just a list of keys."""
    config = setup[2]
    checkpoint = save_detector(config, tmp_path / 'other.pth', **backbone)
    with raises(VanillaNetWeightsError, phrase):
        tool('test', config, checkpoint, '--work-dir', tmp_path)


def test_deploy_before_the_end_of_deep_training(setup, tmp_path):
    config = setup[2]
    model = MODELS.build(detector_cfg(config))
    checkpoint = tmp_path / 'mid.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict(act_learn=0.5)), checkpoint)
    with raises(RuntimeError, 'Cannot fuse VanillaNet with act_learn=0.5', 'Finish the deep-training schedule'):
        tool('deploy', config, checkpoint, tmp_path / 'out')
    model.backbone.act_learn = 0.25
    with raises(RuntimeError, 'Cannot fuse VanillaNet with act_learn=0.25'):
        model.backbone.switch_to_deploy()


# ---- data ---------------------------------------------------------------------------------------------


def test_missing_data(setup, tmp_path):
    root, data, config = setup
    with raises(DataNotFoundError, "train_dataloader.dataset.data_root '/nonexistent/coco/' does not exist",
                '--cfg-options train_dataloader.dataset.data_root=/path/to/data_root'):
        tool('train', config, '--cfg-options', 'train_dataloader.dataset.data_root=/nonexistent/coco/')
    with raises(DataNotFoundError, "train_dataloader.dataset.ann_file 'annotations/instances_trian.json' does not "
                f"exist (looked for '{data}/annotations/instances_trian.json')"):
        tool('train', config, '--cfg-options', 'train_dataloader.dataset.ann_file=annotations/instances_trian.json')
    with raises(DataNotFoundError, "val_dataloader.dataset.data_prefix.img 'vall/' does not exist"):
        tool('train', config, '--cfg-options', 'val_dataloader.dataset.data_prefix.img=vall/')
    with raises(DataNotFoundError, "test_evaluator.ann_file '/nonexistent/val.json' does not exist"):
        tool('test', config, tmp_path / 'never_read.pth', '--cfg-options',
             'test_evaluator.ann_file=/nonexistent/val.json')


def break_first(key, field, value=None):
    """A change to the first entry of ``key`` in a COCO dict: delete ``field``, or set it to ``value``."""

    def change(coco):
        entry = coco[key][0]
        if value is None:
            del entry[field]
        else:
            entry[field] = value

    return change


@pytest.mark.parametrize('change, phrases', [
    (break_first('images', 'height'), ['images[0] "height" must be a positive integer, got None']),
    (break_first('images', 'file_name'), ['images[0] needs a "file_name"']),
    (break_first('annotations', 'bbox', [1, 2, 3]),
     ['annotations[0] "bbox" must be [x, y, width, height] (4 numbers), got [1, 2, 3]']),
    (break_first('annotations', 'image_id', 999), ['annotations[0] "image_id" 999 is not the id of an image']),
    (break_first('annotations', 'area'), ['annotations[0] "area" must be a number, got None']),
    (lambda coco: coco.pop('categories'), ['"categories" is missing (top-level keys: ']),
])
def test_malformed_coco_files(setup, tmp_path, change, phrases):
    root, data, config = setup
    coco = json.load(open(osp.join(data, 'annotations', 'instances_train.json')))
    change(coco)
    ann_file = tmp_path / 'instances_train.json'
    ann_file.write_text(json.dumps(coco))
    with raises(DataConfigError, f"train_dataloader.dataset.ann_file '{ann_file}' is not a valid COCO annotation "
                'file: ', *phrases):
        tool('train', config, '--cfg-options', f'train_dataloader.dataset.ann_file={ann_file}')


def test_truncated_coco_file_and_misspelt_classes(setup, tmp_path):
    root, data, config = setup
    ann_file = tmp_path / 'instances_train.json'
    ann_file.write_text(open(osp.join(data, 'annotations', 'instances_train.json')).read()[:500])
    with raises(DataConfigError, 'is not a valid COCO annotation file: it is not JSON', 'Is it truncated'):
        tool('train', config, '--cfg-options', f'train_dataloader.dataset.ann_file={ann_file}')
    with raises(DataConfigError, "the classes ['circel'] of the config are not category names of the file",
                'silently drop them and shift the labels'):
        tool('train', config, '--cfg-options',
             "train_dataloader.dataset.metainfo.classes=[circel,square,triangle,star,cross]")


# ---- images: 1 or 4 channels, odd sizes ---------------------------------------------------------------


def test_gray_and_rgba_images_of_odd_size_train(tmp_path):
    """mmdet's LoadImageFromFile (color_type='color') turns gray and RGBA images into 3 channels."""
    data = make_data(tmp_path / 'data', num_train=4, num_val=2, image_size=(93, 67))
    train = osp.join(data, 'train')
    image = cv2.imread(osp.join(train, '000000.png'))
    cv2.imwrite(osp.join(train, '000000.png'), cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(osp.join(train, '000001.png'), cv2.cvtColor(image, cv2.COLOR_BGR2BGRA))
    assert cv2.imread(osp.join(train, '000000.png'), cv2.IMREAD_UNCHANGED).ndim == 2
    assert cv2.imread(osp.join(train, '000001.png'), cv2.IMREAD_UNCHANGED).shape == (67, 93, 4)
    config = write_config(tmp_path / 'odd.py', data, max_epochs=1, val_interval=2, custom_hooks=())
    tool('train', config, '--work-dir', tmp_path / 'work', '--cfg-options',
         'model.data_preprocessor.pad_size_divisor=1', 'train_dataloader.dataset.pipeline.2.scale=(93,67)')
    assert (tmp_path / 'work' / 'epoch_1.pth').is_file()


def test_odd_sizes_and_channels_at_the_model(setup):
    model = MODELS.build(detector_cfg(setup[2])).eval()
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 67, 93))
        assert [tuple(f.shape[-2:]) for f in features] == [(8, 11), (4, 5), (2, 2)]
        assert len(model(torch.rand(1, 3, 67, 93), mode='tensor')) == 2  # scores and boxes of the head
        with raises(ValueError, 'VanillaNet expects images of shape (N, 3, H, W), got (1, 4, 64, 64)',
                    'convert 1- or 4-channel images to 3 channels in the data pipeline'):
            model.backbone(torch.rand(1, 4, 64, 64))
