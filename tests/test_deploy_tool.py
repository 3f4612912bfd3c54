"""tools/deploy.py: a trained tiny detector is fused, written and gives the same predictions."""
import copy
import os.path as osp
import re
import subprocess
import sys

import mmengine
import pytest
import torch
from mmengine.config import Config
from mmengine.structures import InstanceData
from tiny_detector import model_config
from torch.nn.modules.batchnorm import _BatchNorm

from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules

from mmdet_vanillanet.checkpoint import VanillaNetWeightsError, load_checkpoint_file
from mmdet_vanillanet.datasets import generate_synthetic_coco, synthetic_coco_metainfo
from mmdet_vanillanet.deploy import deploy_config, deploy_detector

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

# A complete, self-contained config (model, data, evaluation) of a tiny RetinaNet on synthetic COCO: the tools'
# tiny RetinaNet (tiny_detector.py) on a VanillaNet with a stride-1 block.
TINY_CONFIG = """
custom_imports = dict(imports=['mmdet_vanillanet'], allow_failed_imports=False)
default_scope = 'mmdet'
data_root = {data_root!r}
metainfo = {metainfo!r}
{model}
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
test_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CocoDataset', data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                 test_mode=True, pipeline=test_pipeline))
test_evaluator = dict(type='CocoMetric', ann_file=data_root + '/annotations/instances_val.json', metric='bbox')
test_cfg = dict(type='TestLoop')
default_hooks = dict(logger=dict(type='LoggerHook', interval=1))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
log_level = 'INFO'
"""


def write_config(tmp_path, act_num=2, name='retinanet_tiny.py'):
    path = tmp_path / name
    backbone = ("dict(type='VanillaNet', arch=dict(dims=[8, 16, 24, 24, 32], strides=[2, 2, 1, 2]), "
                f"act_num={act_num}, out_indices=(0, 1, 3))")
    path.write_text(TINY_CONFIG.format(data_root=str(tmp_path / 'data'), metainfo=synthetic_coco_metainfo(),
                                       model=model_config(backbone)))
    return str(path)


def batch(num_images=2, size=64, seed=0, with_boxes=False):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_images, 3, size, size, generator=generator)
    meta = dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                batch_input_shape=(size, size), scale_factor=(1.0, 1.0))
    samples = []
    for _ in range(num_images):
        sample = DetDataSample(metainfo=meta)
        if with_boxes:
            corner = torch.rand(3, 2, generator=generator) * size / 2
            sample.gt_instances = InstanceData(
                bboxes=torch.cat([corner, corner + 8 + torch.rand(3, 2, generator=generator) * size / 2], 1),
                labels=torch.randint(0, 5, (3,), generator=generator))
        samples.append(sample)
    return inputs, samples


def train_tiny_detector(config_path, steps=3):
    """Build the config's detector and train it a few steps (BN statistics randomised first, so fusing matters)."""
    register_all_modules()
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(config_path).model)
    model.init_weights()
    generator = torch.Generator().manual_seed(0)
    for module in model.backbone.modules():
        if isinstance(module, _BatchNorm):
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(module.num_features, generator=generator) * 0.5 + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    for step in range(steps):
        loss, _ = model.parse_losses(model.loss(*batch(seed=step, with_boxes=True)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Three steps leave every score near the prior (0.0101), where ties make the order of predictions
    # arbitrary; a well-scaled random classifier gives distinct scores and so a defined order.
    with torch.no_grad():
        model.bbox_head.retina_cls.weight.normal_(0, 20.0, generator=generator)
    return model.eval()


def save_checkpoint(model, path, **meta):
    torch.save({'state_dict': model.state_dict(),
                'meta': {'dataset_meta': synthetic_coco_metainfo(), 'epoch': 1, **meta}}, path)
    return str(path)


def predictions(model, inputs, samples):
    with torch.no_grad():
        results = model.eval().predict(inputs, [s.clone() for s in samples])
    return [(r.pred_instances.bboxes, r.pred_instances.scores, r.pred_instances.labels) for r in results]


def test_deploy_tool_fuses_a_trained_detector_with_equal_predictions(tmp_path):
    config = write_config(tmp_path)
    model = train_tiny_detector(config)
    checkpoint = save_checkpoint(model, tmp_path / 'epoch_1.pth', act_learn=1.0)
    out_dir = tmp_path / 'deploy'
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'deploy.py'), config, checkpoint, str(out_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    deviation = float(re.search(r'max deviation: (\S+) absolute', result.stdout).group(1))
    assert deviation < 1e-4, result.stdout
    assert f'python tools/test.py {out_dir}/retinanet_tiny_deploy.py {out_dir}/retinanet_tiny_deploy.pth' \
        in result.stdout

    cfg = Config.fromfile(str(out_dir / 'retinanet_tiny_deploy.py'))
    assert cfg.model.backbone.deploy is True and cfg.model.backbone.init_cfg is None
    # a short config: the source config as _base_, then only what fusing changes
    text = (out_dir / 'retinanet_tiny_deploy.py').read_text()
    assert "_base_ = '../retinanet_tiny.py'" in text
    assert "model = {'backbone': {'deploy': True, 'init_cfg': None}}" in text
    assert len(text.splitlines()) == 4
    assert cfg.custom_imports.imports == ['mmdet_vanillanet'] and cfg.test_dataloader.batch_size == 2
    fused = MODELS.build(cfg.model)
    saved = load_checkpoint_file(str(out_dir / 'retinanet_tiny_deploy.pth'))
    fused.load_state_dict(saved['state_dict'], strict=True)
    assert saved['meta']['act_learn'] == 1.0 and saved['meta']['dataset_meta'] == synthetic_coco_metainfo()
    assert not hasattr(fused.backbone, 'stem1')

    inputs, samples = batch(num_images=2, size=96, seed=7)
    for (boxes, scores, labels), (boxes_f, scores_f, labels_f) in zip(
            predictions(model, inputs, samples), predictions(fused, inputs, samples), strict=True):
        assert len(scores) > 0 and torch.equal(labels, labels_f)
        torch.testing.assert_close(boxes_f, boxes, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(scores_f, scores, rtol=1e-4, atol=1e-5)


def test_deploy_refuses_mismatched_or_unfinished_checkpoints(tmp_path):
    config = write_config(tmp_path)
    model = train_tiny_detector(config, steps=0)
    other_act_num = write_config(tmp_path, act_num=3, name='act3.py')
    checkpoint = save_checkpoint(model, tmp_path / 'ckpt.pth')
    with pytest.raises(VanillaNetWeightsError, match=r'checkpoint has 5x5 activation kernels \(act_num=2\), '
                                                     r'the model has act_num=3'):
        deploy_detector(other_act_num, checkpoint, str(tmp_path / 'out'))
    unfinished = save_checkpoint(model, tmp_path / 'mid.pth', act_learn=0.5)
    with pytest.raises(RuntimeError, match=r'act_learn=0\.5'):
        deploy_detector(config, unfinished, str(tmp_path / 'out'))
    assert not (tmp_path / 'out' / 'retinanet_tiny_deploy.pth').exists()


def test_deploy_config_drops_backbone_init_cfg(tmp_path):
    cfg = Config.fromfile(write_config(tmp_path))
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=str(tmp_path / 'imagenet.pth'))
    new = deploy_config(cfg)
    assert new.model.backbone.deploy is True and new.model.backbone.init_cfg is None
    assert cfg.model.backbone.init_cfg.type == 'Pretrained'  # the input config is left alone


def test_deploy_the_demo_config(tmp_path):
    """A config inheriting mmdet's (``_base_``): the deploy config inherits it in turn and builds the fused detector."""
    config = osp.join(ROOT, 'configs', 'demo', 'retinanet_vanillanet_demo.py')
    register_all_modules()
    model = MODELS.build(Config.fromfile(config).model)
    model.init_weights()
    checkpoint = save_checkpoint(model, tmp_path / 'demo.pth')
    result = deploy_detector(config, checkpoint, str(tmp_path), shape=(96, 128), num_images=1)
    assert result['fused'] == ['backbone'] and result['max_rel'] < 1e-4
    assert result['params_after'] < result['params_before']
    cfg = Config.fromfile(result['config'])
    assert cfg.model.backbone.deploy is True and cfg.model.type == 'RetinaNet'
    assert cfg.custom_imports.imports == ['mmdet_vanillanet'] and cfg.test_evaluator.type == 'CocoMetric'
    MODELS.build(cfg.model).load_state_dict(load_checkpoint_file(result['checkpoint'])['state_dict'], strict=True)


@pytest.mark.slow
def test_fused_checkpoint_gives_the_same_coco_map(tmp_path):
    """tools/test.py on synthetic COCO: the original and the fused detector score the same."""
    generate_synthetic_coco(str(tmp_path / 'data'), num_train=1, num_val=4, image_size=64, show_progress=False)
    config = write_config(tmp_path)
    checkpoint = save_checkpoint(train_tiny_detector(config, steps=10), tmp_path / 'epoch_1.pth')
    out_dir = tmp_path / 'deploy'
    deploy_detector(config, checkpoint, str(out_dir))

    def evaluate(cfg, ckpt, name):
        dump = str(tmp_path / f'{name}.pkl')
        result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'test.py'), cfg, ckpt, '--out', dump,
                                 '--work-dir', str(tmp_path / 'work')],
                                cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return float(re.search(r'coco/bbox_mAP: (\S+)', result.stdout + result.stderr).group(1)), mmengine.load(dump)

    original_map, original = evaluate(config, checkpoint, 'original')
    fused_map, fused = evaluate(str(out_dir / 'retinanet_tiny_deploy.py'),
                                str(out_dir / 'retinanet_tiny_deploy.pth'), 'fused')
    assert abs(original_map - fused_map) <= 0.001
    assert len(original) == len(fused) == 4
    for a, b in zip(original, fused):
        a, b = a['pred_instances'], b['pred_instances']
        assert len(a['scores']) > 0
        torch.testing.assert_close(b['scores'], a['scores'], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b['bboxes'], a['bboxes'], rtol=1e-4, atol=1e-3)


def test_a_vanillanet_inside_a_list_gets_the_whole_config_written(tmp_path):
    """Inheritance replaces lists whole: then the deploy config is the full config with the overrides."""
    from mmdet_vanillanet.deploy import write_deploy_config
    cfg = Config.fromfile(write_config(tmp_path))
    cfg.model.extra_backbones = [copy.deepcopy(cfg.model.backbone)]
    path = write_deploy_config(str(tmp_path / 'retinanet_tiny.py'), cfg, str(tmp_path / 'listed_deploy.py'), 'x.pth')
    written = Config.fromfile(path)
    assert '_base_ =' not in (tmp_path / 'listed_deploy.py').read_text()
    assert written.model.extra_backbones[0].deploy is True and written.model.backbone.deploy is True
    assert written.load_from == 'x.pth'


def test_relative_deviation_measures_each_output_against_its_own_scale():
    from mmdet_vanillanet.output_comparison import relative_deviation
    reference = [torch.tensor([1.0, -2.0]), torch.tensor([10.0, 0.0]), torch.zeros(2)]
    result = relative_deviation(reference, [torch.tensor([1.0, -2.0]), torch.tensor([10.0, 0.5]),
                                            torch.tensor([0.0, 1e-3])])
    assert result['max_rel'] == pytest.approx(0.05) and result['max_abs'] == pytest.approx(0.5)
    assert result['num_tensors'] == 3
    with pytest.raises(ValueError, match='different shapes'):
        relative_deviation(reference, [torch.zeros(3), torch.zeros(2), torch.zeros(2)])


def test_relative_deviation_fails_on_non_finite_values_and_names_them():
    from mmdet_vanillanet.output_comparison import NonFiniteOutputsError, relative_deviation
    finite = [torch.ones(3), torch.ones(2, 2)]
    with pytest.raises(NonFiniteOutputsError, match=r'outputs: output 1 holds 2 NaN \(of 4 values\)'):
        relative_deviation(finite, [torch.ones(3), torch.tensor([[1.0, float('nan')], [float('nan'), 1.0]])])
    with pytest.raises(NonFiniteOutputsError, match=r'reference: output 0 holds 1 \+Inf and 1 -Inf'):
        relative_deviation([torch.tensor([1.0, float('inf'), -float('inf')]), torch.ones(2, 2)], finite)
    # the same NaN on both sides is no agreement
    both = [torch.tensor([float('nan')])]
    with pytest.raises(NonFiniteOutputsError, match='reference: output 0 holds 1 NaN.*outputs: output 0 holds 1 NaN'):
        relative_deviation(both, both)


def test_deploy_refuses_a_detector_with_non_finite_outputs(tmp_path):
    """A diverged training's weights: NaN box deltas and infinite scores. Nothing is written."""
    from mmdet_vanillanet.deploy import DeployCheckError
    config = write_config(tmp_path)
    model = train_tiny_detector(config, steps=0)
    with torch.no_grad():
        model.bbox_head.retina_reg.bias[0] = float('nan')
        model.bbox_head.retina_cls.bias[0] = float('inf')
    checkpoint = save_checkpoint(model, tmp_path / 'diverged.pth')
    with pytest.raises(DeployCheckError, match=r'the detector before fusing: output 0 holds \d+ \+Inf .*'
                                               r'output 3 holds \d+ NaN .*Nothing was written'):
        deploy_detector(config, checkpoint, str(tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()


def test_building_a_detector_leaves_the_callers_default_scope(tmp_path):
    from mmengine.registry import DefaultScope, init_default_scope

    from mmdet_vanillanet.detectors import build_detector
    init_default_scope('mmengine')
    model = build_detector(Config.fromfile(write_config(tmp_path)).model, init_weights=True)
    assert type(model).__name__ == 'RetinaNet' and not model.training
    assert DefaultScope.get_current_instance().scope_name == 'mmengine'


def test_exporting_with_random_weights_leaves_the_callers_random_state(tmp_path):
    from mmdet_vanillanet.export import export_from_config
    state = torch.random.get_rng_state()
    export_from_config(write_config(tmp_path), str(tmp_path / 'backbone.onnx'), shape=(64, 64))
    assert torch.equal(torch.random.get_rng_state(), state)
