"""The configs in configs/: they load, their necks match the backbone's own output description,
they build and run one training iteration and one prediction (with a narrow VanillaNet of the same
depth and strides), and the two recipe configs hold the VanillaNet paper's COCO recipe: settings,
layer-wise lr decay on the built optimizer, and the lr schedule stepped as mmengine steps it.
"""
import argparse
import copy
import functools
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config, DictAction
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

from mmdet.registry import HOOKS, MODELS, PARAM_SCHEDULERS
from mmdet.testing import demo_mm_inputs

import mmdet_vanillanet  # noqa: F401  (registration)
from mmdet_vanillanet.engine.layer_decay import default_num_layers
from mmdet_vanillanet.models import ARCH_SETTINGS, VanillaNet, resolve_arch

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / 'configs'
CONFIGS = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob('*.py') if '_base_' not in p.parts)
RECIPES = {
    'retinanet_vanillanet13_1x.py': dict(lr=8e-5, out_indices=(1, 8, 10), strides=[8, 16, 32],
                                         channels=[1024, 2048, 4096], metrics=['bbox'],
                                         deploy_params_m=75.4),
    'mask-rcnn_vanillanet13_1x.py': dict(lr=1.3e-4, out_indices=(0, 1, 8, 10),
                                         strides=[4, 8, 16, 32], channels=[512, 1024, 2048, 4096],
                                         metrics=['bbox', 'segm'], deploy_params_m=77.1),
}
AMP_OF = {name.replace('_1x.py', '_1x_amp.py'): name for name in RECIPES}
DROP_IN = ['drop-in/faster-rcnn_vanillanet13_fpn_1x_coco.py',
           'drop-in/fcos_vanillanet13_fpn_gn-head_1x_coco.py',
           'drop-in/cascade-mask-rcnn_vanillanet13_fpn_1x_coco.py',
           'drop-in/dino-4scale_vanillanet13_8xb2-12e_coco.py']
WARMUP_ITERS = 500
WARMUP_START = 0.001
MAX_EPOCHS = 12
GPUS, IMAGES_PER_GPU = 8, 4
NEEDS_CUDA = ('AmpOptimWrapper needs CUDA (mmengine asserts it); '
              'on CPU only loading and building are tested')


@functools.lru_cache(maxsize=None)
def _load_once(name):
    return Config.fromfile(str(CONFIG_DIR / name))


def load(name):
    """A fresh copy of a config (parsing mmdet's bases takes a while; do it once per file)."""
    return copy.deepcopy(_load_once(name))


def uses_amp(cfg):
    return cfg.optim_wrapper.get('type') == 'AmpOptimWrapper'


def backbone_on_meta(backbone_cfg):
    """The VanillaNet a config describes, built without memory and without reading its weights."""
    kwargs = {k: v for k, v in backbone_cfg.items() if k not in ('type', 'init_cfg')}
    with torch.device('meta'):
        return VanillaNet(**kwargs)


def narrow(backbone_cfg):
    """The same VanillaNet (blocks, strides, out_indices, act_num), widths / 64, no weights."""
    arch = resolve_arch(backbone_cfg['arch'])
    arch['dims'] = [max(8, d // 64) for d in arch['dims']]
    return dict(backbone_cfg, arch=arch, init_cfg=None)


# Neck and head widths of mmdet's CNN detectors, and what the tests use instead.
HEAD_WIDTHS = {'in_channels': (256, 32), 'out_channels': (256, 32), 'feat_channels': (256, 32),
               'conv_out_channels': (256, 32), 'fc_out_channels': (1024, 64)}


def narrow_heads(node):
    """Shrink the neck and head widths in place (same layers, fewer channels)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in HEAD_WIDTHS and value == HEAD_WIDTHS[key][0]:
                node[key] = HEAD_WIDTHS[key][1]
            else:
                narrow_heads(value)
    elif isinstance(node, list):
        for value in node:
            narrow_heads(value)


def tiny_model_cfg(cfg):
    """The config's detector with the narrow backbone, a neck that matches it and narrow heads.

    DETR-like detectors keep their transformer widths (set in many places, some by default) but
    select fewer queries than a tiny image has encoder tokens.
    """
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone = narrow(model_cfg.backbone)
    if 'encoder' in model_cfg:
        model_cfg.num_queries = 30
    else:
        narrow_heads({k: v for k, v in model_cfg.items() if k != 'backbone'})
    model_cfg.neck.in_channels = backbone_on_meta(model_cfg.backbone).out_channels
    return model_cfg


def smallest_num_classes(node):
    """The fewest classes any head of the model predicts (fake labels must fit every head)."""
    if isinstance(node, dict):
        found = [node['num_classes']] if 'num_classes' in node else []
        found += [smallest_num_classes(v) for v in node.values()]
    elif isinstance(node, (list, tuple)):
        found = [smallest_num_classes(v) for v in node]
    else:
        return math.inf
    return min(found, default=math.inf)


def has_mask_head(model_cfg):
    return 'mask_head' in model_cfg.get('roi_head', {})


def neck_output_strides(model_cfg):
    """Strides of the neck's outputs: the backbone's, from the neck's start level, then doubling."""
    neck = model_cfg.neck
    strides = backbone_on_meta(model_cfg.backbone).out_strides
    strides = strides[neck.get('start_level', 0):]
    if neck.get('end_level', -1) != -1:
        strides = strides[:neck.end_level - neck.get('start_level', 0) + 1]
    while len(strides) < neck.num_outs:
        strides.append(strides[-1] * 2)
    return strides


def head_strides(node, path='model'):
    """Every stride list the heads assume (prior generators, RoI extractors, FCOS-like heads)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ('strides', 'featmap_strides') and isinstance(value, (list, tuple)):
                yield f'{path}.{key}', [s[0] if isinstance(s, (list, tuple)) else s for s in value]
            elif key not in ('backbone', 'neck'):
                yield from head_strides(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from head_strides(value, f'{path}[{i}]')


# ---- every config ------------------------------------------------------------------------------

def test_configs_exist():
    expected = list(RECIPES) + list(AMP_OF) + DROP_IN
    assert not set(expected) - set(CONFIGS), f'missing configs: {set(expected) - set(CONFIGS)}'


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_and_neck_matches_backbone(name):
    cfg = load(name)
    assert cfg.custom_imports == dict(imports=['mmdet_vanillanet'], allow_failed_imports=False)
    assert dict(type='RandomStateHook') in cfg.custom_hooks  # README: exact resume with every config here
    assert cfg.model.backbone.type == 'VanillaNet'
    backbone = backbone_on_meta(cfg.model.backbone)
    # The neck's input widths are the backbone's own output description, not guessed numbers.
    assert list(cfg.model.neck.in_channels) == backbone.out_channels
    # The heads assume the strides that the backbone and neck produce.
    strides = neck_output_strides(cfg.model)
    found = list(head_strides(cfg.model))
    for path, head in found:
        assert head == strides[:len(head)], f'{path}={head}, but the neck outputs strides {strides}'


@pytest.mark.parametrize('name', CONFIGS)
def test_builds_trains_one_iteration_and_predicts(name):
    cfg = load(name)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    torch.manual_seed(0)
    model_cfg = tiny_model_cfg(cfg)
    model = MODELS.build(model_cfg)
    model.init_weights()  # as the Runner does before training
    data = demo_mm_inputs(batch_size=2, image_shapes=(3, 64, 96), num_items=[3, 2],
                          num_classes=smallest_num_classes(model_cfg),
                          with_mask=has_mask_head(model_cfg))
    if uses_amp(cfg):
        if not torch.cuda.is_available():
            pytest.skip(f'training iteration skipped: {NEEDS_CUDA}')
        model = model.cuda()
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)

    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    log_vars = model.train_step(data, optim_wrapper)
    assert math.isfinite(float(log_vars['loss'].detach())), log_vars
    changed = [n for n, p in model.named_parameters()
               if n in before and not torch.equal(p, before[n])]
    assert any(n.startswith('backbone.') for n in changed), 'the backbone did not train'
    assert any(not n.startswith('backbone.') for n in changed), 'the neck and heads did not train'

    model.eval()
    with torch.no_grad():
        results = model.test_step(data)
    assert len(results) == 2
    for result in results:
        assert 'bboxes' in result.pred_instances
        if has_mask_head(model_cfg):
            assert 'masks' in result.pred_instances


# ---- the recipe configs ------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(RECIPES) + list(AMP_OF))
def test_recipe_settings(name):
    cfg = load(name)
    recipe = RECIPES[AMP_OF.get(name, name)]
    backbone = cfg.model.backbone
    assert backbone.arch == 'vanillanet_13' and backbone.act_num == 4
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=cfg.pretrained)
    assert Path(cfg.pretrained).name == 'vanillanet_13_act_num_4_kd_pretrain.pth'
    # BN in the model, SyncBN in multi-GPU runs (mmengine converts when `sync_bn` is set).
    assert backbone.norm_cfg == dict(type='BN', eps=1e-6) and cfg.sync_bn == 'torch'
    assert tuple(backbone.out_indices) == recipe['out_indices']
    description = backbone_on_meta(backbone)
    assert description.out_strides == recipe['strides']
    assert description.out_channels == recipe['channels']
    if 'retinanet' in name:
        assert cfg.model.neck.start_level == 0 and cfg.model.neck.num_outs == 5

    optimizer = cfg.optim_wrapper.optimizer
    assert optimizer == dict(type='AdamW', lr=recipe['lr'], betas=(0.9, 0.999), weight_decay=0.05)
    assert cfg.optim_wrapper.constructor == 'VanillaNetLayerDecayOptimizerConstructor'
    assert cfg.optim_wrapper.paramwise_cfg == dict(decay_rate=0.6, num_layers=6)
    assert cfg.optim_wrapper.type == ('AmpOptimWrapper' if name in AMP_OF else 'OptimWrapper')
    if name in AMP_OF:
        assert cfg.optim_wrapper.loss_scale == 'dynamic'

    # 32 images per step: 8 GPUs x 4, and the lr scales from 32 with --auto-scale-lr.
    assert cfg.train_dataloader.batch_size == IMAGES_PER_GPU
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=GPUS * IMAGES_PER_GPU)
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop' and cfg.train_cfg.max_epochs == MAX_EPOCHS

    pipeline = {step.type: step for step in cfg.train_dataloader.dataset.pipeline}
    resize = pipeline['RandomChoiceResize']
    assert [tuple(s) for s in resize.scales] == [(1333, short) for short in range(480, 1025, 32)]
    assert resize.keep_ratio and pipeline['RandomFlip'].prob == 0.5
    assert pipeline['LoadAnnotations'].get('with_mask', False) == ('segm' in recipe['metrics'])
    for loader in (cfg.val_dataloader, cfg.test_dataloader):
        resize = next(s for s in loader.dataset.pipeline if s.type == 'Resize')
        assert tuple(resize.scale) == (1333, 800) and resize.keep_ratio
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        assert evaluator.type == 'CocoMetric'
        metrics = evaluator.metric if isinstance(evaluator.metric, list) else [evaluator.metric]
        assert metrics == recipe['metrics']

    assert dict(type='CheckInvalidLossHook', interval=1) in cfg.custom_hooks


@pytest.mark.parametrize('name', list(RECIPES))
def test_parameter_count_matches_the_paper(name):
    """The full-size detector, fused for deployment, has the paper's parameter count (75.4M / 77.1M)."""
    cfg = load(name)
    init_default_scope('mmdet')
    cfg.model.backbone.init_cfg = None
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
        model.backbone.switch_to_deploy()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert params_m == pytest.approx(RECIPES[name]['deploy_params_m'], abs=0.06)


def test_amp_configs_change_only_the_optim_wrapper_type():
    for amp, base in AMP_OF.items():
        amp_cfg, base_cfg = load(amp).to_dict(), load(base).to_dict()
        amp_wrapper, base_wrapper = amp_cfg.pop('optim_wrapper'), base_cfg.pop('optim_wrapper')
        assert amp_cfg == base_cfg
        assert amp_wrapper == dict(base_wrapper, type='AmpOptimWrapper', loss_scale='dynamic')


def test_invalid_loss_stops_training():
    """The hook the recipe configs carry raises at the first non-finite loss."""
    cfg = load('retinanet_vanillanet13_1x.py')
    init_default_scope('mmdet')
    hook = HOOKS.build(cfg.custom_hooks[0])

    class FakeRunner:
        iter = 0
        logger = logging.getLogger(__name__)

    hook.after_train_iter(FakeRunner(), 0, outputs=dict(loss=torch.tensor(1.0)))
    for bad in (float('nan'), float('inf')):
        with pytest.raises(AssertionError):
            hook.after_train_iter(FakeRunner(), 0, outputs=dict(loss=torch.tensor(bad)))


def recipe_optim_wrapper(cfg):
    """The recipe's optimizer wrapper on the narrow detector (a plain OptimWrapper for AMP)."""
    init_default_scope('mmdet')
    model = MODELS.build(tiny_model_cfg(cfg))
    wrapper_cfg = copy.deepcopy(cfg.optim_wrapper)
    wrapper_cfg.pop('loss_scale', None)
    wrapper_cfg.type = 'OptimWrapper'
    return model, build_optim_wrapper(model, wrapper_cfg)


@pytest.mark.parametrize('name', list(RECIPES) + DROP_IN)
def test_layer_decay_param_groups(name):
    cfg = load(name)
    model, optim_wrapper = recipe_optim_wrapper(cfg)
    base_lr = cfg.optim_wrapper.optimizer.lr
    base_wd = cfg.optim_wrapper.optimizer.weight_decay
    num_layers = cfg.optim_wrapper.paramwise_cfg.num_layers
    groups = optim_wrapper.optimizer.param_groups
    group_of = {id(p): g for g in groups for p in g['params']}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(group_of) == len(trainable) == sum(len(g['params']) for g in groups)

    lr_of_layer = {}
    for param_name, param in trainable:
        group = group_of[id(param)]
        layer_id = group['layer_id']
        lr_of_layer.setdefault(layer_id, group['lr'])
        assert group['lr'] == pytest.approx(lr_of_layer[layer_id]), param_name
        parts = param_name.split('.')
        if parts[0] != 'backbone':
            expected_id = num_layers + 1
            assert group['lr'] == pytest.approx(base_lr), f'{param_name}: not the full lr'
        elif parts[1].startswith('stem'):
            expected_id = 0
        else:
            expected_id = int(parts[2]) // 2 + 1  # backbone.stages.<k>...
        assert layer_id == expected_id, param_name
        no_decay = param.ndim == 1 or param_name.endswith('.bias')
        assert group['weight_decay'] == (0.0 if no_decay else base_wd), param_name
    # VanillaNet-13's 11 blocks use layer ids 0 ... 6, the rest of the detector id 7.
    assert sorted(lr_of_layer) == list(range(num_layers + 2))
    for layer_id in range(num_layers + 1):
        assert lr_of_layer[layer_id] / lr_of_layer[layer_id + 1] == pytest.approx(0.6)
    assert lr_of_layer[0] == pytest.approx(base_lr * 0.6 ** (num_layers + 1))


# ---- the schedule ------------------------------------------------------------------------------

def expected_lr_factor(i, total_iters):
    """Linear warm-up (0.001 -> 1 over 500 iterations) times linear decay (1 -> 0 over the run)."""
    warmup = WARMUP_START + (1 - WARMUP_START) * min(i, WARMUP_ITERS - 1) / (WARMUP_ITERS - 1)
    decay = 1 - i / (total_iters - 1)
    return warmup * decay


# Iterations per epoch: COCO's is 3665 at 32 images per step; the factors depend only on the
# total, so a short epoch checks the same formula in a fraction of the steps.
EPOCH_LENGTH = 100


@pytest.mark.parametrize('name', list(RECIPES))
def test_schedule_is_linear_warmup_then_linear_decay(name):
    cfg = load(name)
    _, optim_wrapper = recipe_optim_wrapper(cfg)
    optimizer = optim_wrapper.optimizer
    base_lrs = [g['lr'] for g in optimizer.param_groups]
    # As mmengine's Runner builds them (epoch-based entries become per-iteration ones).
    schedulers = [PARAM_SCHEDULERS.build(s, default_args=dict(optimizer=optim_wrapper,
                                                              epoch_length=EPOCH_LENGTH))
                  for s in copy.deepcopy(cfg.param_scheduler)]
    assert all(not s.by_epoch for s in schedulers), 'every scheduler must step per iteration'
    total = MAX_EPOCHS * EPOCH_LENGTH
    checkpoints = [0, 1, 250, WARMUP_ITERS - 1, WARMUP_ITERS, 1000,
                   total // 2, total - 2, total - 1]
    seen = {}
    for i in range(total):
        if i in checkpoints:
            seen[i] = [g['lr'] for g in optimizer.param_groups]
        optim_wrapper.step()  # no gradients, no change; keeps mmengine's step-order check quiet
        for scheduler in schedulers:  # what ParamSchedulerHook does after every train iteration
            scheduler.step()
    for i in checkpoints:
        factor = expected_lr_factor(i, total)
        assert seen[i] == pytest.approx([lr * factor for lr in base_lrs], rel=1e-6, abs=1e-15), i
    top = cfg.optim_wrapper.optimizer.lr
    assert seen[0][-1] == pytest.approx(top * 0.001)
    assert seen[WARMUP_ITERS - 1][-1] == pytest.approx(top * (1 - (WARMUP_ITERS - 1) / (total - 1)))
    assert seen[total // 2][-1] == pytest.approx(top * (1 - (total // 2) / (total - 1)))
    assert seen[total - 1][-1] == pytest.approx(0.0, abs=1e-12)


# ---- the variants documented in the README -----------------------------------------------------

VARIANT_LINE = re.compile(r'--cfg-options (model\.backbone\.arch=\S+.*)$')


def documented_variant_lines():
    """`--cfg-options` lines that switch a recipe config to another VanillaNet, from the docs."""
    lines = {}
    for doc in (REPO / 'README.md', REPO / 'docs' / 'configs.md'):
        if not doc.exists():
            continue
        for line in doc.read_text().splitlines():
            match = VARIANT_LINE.search(line.strip().strip('`'))
            if match and 'tools/train.py' in line:
                config = re.search(r'configs/(\S+\.py)', line).group(1)
                lines.setdefault((config, match.group(1).split()[0]), (config, match.group(1)))
    return sorted(lines.values())


def parse_cfg_options(text):
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(['--cfg-options'] + [t.strip('"\'') for t in text.split()]).cfg_options


def test_every_variant_is_documented_and_consistent():
    lines = documented_variant_lines()
    documented = {(config, parse_cfg_options(opts)['model.backbone.arch'])
                  for config, opts in lines}
    expected_archs = [a for a in ARCH_SETTINGS if a != 'vanillanet_13' and 'ada_pool' not in a]
    for config in RECIPES:
        needs_stride_4 = 4 in RECIPES[config]['strides']
        for arch in expected_archs:
            if needs_stride_4 and 4 not in backbone_on_meta(dict(arch=arch)).block_strides:
                continue  # vanillanet_5 and _6 have no stride-4 block: no 4-level FPN
            assert (config, arch) in documented, f'no documented line for {arch} in {config}'

    for config, opts in lines:
        cfg = load(config)
        cfg.merge_from_dict(parse_cfg_options(opts))
        backbone = backbone_on_meta(cfg.model.backbone)
        assert backbone.out_strides == RECIPES[config]['strides'], (config, opts)
        assert list(cfg.model.neck.in_channels) == backbone.out_channels, (config, opts)
        assert cfg.optim_wrapper.paramwise_cfg.num_layers == default_num_layers(backbone.num_blocks)
        assert Path(cfg.model.backbone.init_cfg.checkpoint).name.startswith(backbone.arch_name)


def narrow_recipe_without_weights(tmp_path, data_root):
    cfg = load('retinanet_vanillanet13_1x.py')
    missing = tmp_path / 'nowhere' / 'vanillanet_13_act_num_4_kd_pretrain.pth'
    cfg.merge_from_dict({'model.backbone.init_cfg.checkpoint': str(missing)})
    cfg.model.backbone.arch = narrow(cfg.model.backbone)['arch']
    cfg.model.neck.in_channels = backbone_on_meta(cfg.model.backbone).out_channels
    cfg.work_dir = str(tmp_path / 'work')
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = data_root
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator].ann_file = f'{data_root}/annotations/instances_val2017.json'
    return cfg, missing


def test_missing_pretrained_weights_stop_the_training_tool_before_any_data_is_read(tmp_path):
    from tiny_detector import load_tool
    cfg, missing = narrow_recipe_without_weights(tmp_path, str(tmp_path / 'no_data'))
    cfg.dump(str(tmp_path / 'recipe.py'))
    with pytest.raises(FileNotFoundError) as error:
        load_tool('train').main([str(tmp_path / 'recipe.py')])
    message = str(error.value)
    assert str(missing) in message
    assert 'no_data' not in message
    assert 'init_cfg' in message  # how to point at the weights


def test_missing_pretrained_weights_stop_mmengines_runner_before_the_first_iteration(tmp_path):
    """mmdet's own tools/train.py builds the datasets first, then initialises the weights: same message."""
    from released_detectors import coco_layout
    from tiny_detector import make_data
    data_root = coco_layout(make_data(tmp_path / 'shapes'), str(tmp_path / 'coco'))
    cfg, missing = narrow_recipe_without_weights(tmp_path, data_root)
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as error:
        Runner.from_cfg(cfg).train()
    assert 'model.backbone.init_cfg.checkpoint=' in str(error.value)
    assert not list((tmp_path / 'work').rglob('*.pth'))


# ---- the README's snippet ----------------------------------------------------------------------

def readme_snippet():
    """The python block under README's "Use VanillaNet in your own mmdet config"."""
    text = (REPO / 'README.md').read_text()
    section = text.split('## Use VanillaNet in your own mmdet config', 1)[1]
    return re.search(r'```python\n(.*?)```', section, flags=re.S).group(1)


@pytest.mark.parametrize('base', ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
                                  'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'])
def test_readme_snippet_pasted_into_a_single_stage_base_keeps_the_strides(base, tmp_path):
    config = tmp_path / 'mine.py'
    config.write_text(f'_base_ = {base!r}\n' + readme_snippet())
    cfg = Config.fromfile(str(config))
    backbone = backbone_on_meta(cfg.model.backbone)
    assert list(cfg.model.neck.in_channels) == backbone.out_channels
    strides = neck_output_strides(cfg.model)
    for path, head in head_strides(cfg.model):
        assert head == strides[:len(head)], f'{path}={head}, but the neck outputs strides {strides}'
