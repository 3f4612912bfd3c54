"""Weights in: published checkpoint formats, mismatch messages, partial loads, the converter tool."""
import argparse
import logging
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.logging import MMLogger
from tiny_detector import load_tool, randomize_bn

from mmdet.registry import MODELS

from mmdet_vanillanet.checkpoint import (
    VanillaNetWeightsError,
    check_backbone_state_dict,
    describe_state_dict,
    load_pretrained_backbone,
)
from mmdet_vanillanet.models import ARCH_SETTINGS, VanillaNet

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
NARROW = dict(dims=[8, 16, 24, 24, 32], strides=[2, 2, 1, 2])
NARROW_7 = dict(dims=[8, 8, 16, 16, 16, 24, 24], strides=[1, 2, 2, 1, 2, 1])
NUM_CLASSES = 10


def random_net(arch=NARROW, act_num=3, seed=0, deploy=False):
    """A VanillaNet with random weights and BN statistics: a stand-in for an ImageNet-trained one."""
    torch.manual_seed(seed)
    net = VanillaNet(arch=arch, act_num=act_num, out_indices=range(len(arch['strides'])))
    net.init_weights()
    randomize_bn(net, torch.Generator().manual_seed(seed))
    net.eval()
    if deploy:
        net.switch_to_deploy()
    return net


def with_classifier(state_dict, deploy=False):
    """Add the published classifier keys: ``cls1`` (pool, dropout, conv, BN) + ``cls2`` (conv), or deploy ``cls``."""
    width = [v.shape[0] for k, v in state_dict.items() if k.endswith('act.weight')][-1]
    out = {k: v.clone() for k, v in state_dict.items()}
    if deploy:
        out['cls.2.weight'] = torch.randn(NUM_CLASSES, width, 1, 1)
        out['cls.2.bias'] = torch.randn(NUM_CLASSES)
        return out
    out['cls1.2.weight'] = torch.randn(NUM_CLASSES, width, 1, 1)
    out['cls1.2.bias'] = torch.randn(NUM_CLASSES)
    for name, value in (('weight', torch.ones(NUM_CLASSES)), ('bias', torch.zeros(NUM_CLASSES)),
                        ('running_mean', torch.zeros(NUM_CLASSES)), ('running_var', torch.ones(NUM_CLASSES)),
                        ('num_batches_tracked', torch.tensor(1000))):
        out[f'cls1.3.{name}'] = value
    out['cls2.0.weight'] = torch.randn(NUM_CLASSES, NUM_CLASSES, 1, 1)
    out['cls2.0.bias'] = torch.randn(NUM_CLASSES)
    return out


def published(ema, model, act_num, arch_name='vanillanet_x'):
    """A classification checkpoint the way the originals are saved."""
    args = argparse.Namespace(model=arch_name, act_num=act_num, epochs=300, lr=3.5e-3, model_ema=True)
    return {'model': model, 'model_ema': ema, 'optimizer': {}, 'epoch': 299, 'args': args}


def save(obj, tmp_path, name='ckpt.pth'):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def features(net, seed=1):
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return net.eval()(x)


def pretrained_net(path, arch=NARROW, act_num=3, deploy=False, **init_kwargs):
    net = MODELS.build(dict(type='VanillaNet', arch=arch, act_num=act_num, deploy=deploy,
                            out_indices=range(len(arch['strides'])),
                            init_cfg=dict(type='Pretrained', checkpoint=path, **init_kwargs)))
    net.init_weights()
    return net


def assert_same_features(a, b, exact=True):
    for x, y in zip(features(a), features(b), strict=True):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.fixture
def log_lines():
    """Messages logged through mmengine's current logger during the test."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


# ---- formats ------------------------------------------------------------------------------------

FORMATS = ['published', 'bare', 'ddp', 'ddp_published', 'detector']


def wrap(fmt, state_dict, other):
    if fmt == 'published':
        return published(with_classifier(state_dict), with_classifier(other), act_num=3)
    if fmt == 'bare':
        return with_classifier(state_dict)
    if fmt == 'ddp':
        return {'module.' + k: v for k, v in with_classifier(state_dict).items()}
    if fmt == 'ddp_published':
        ddp = {'module.' + k: v for k, v in with_classifier(state_dict).items()}
        return published(ddp, {'module.' + k: v for k, v in other.items()}, act_num=3)
    detector = {'backbone.' + k: v for k, v in state_dict.items()}
    detector.update({'neck.lateral_convs.0.conv.weight': torch.randn(4, 8, 1, 1),
                     'bbox_head.retina_cls.weight': torch.randn(9, 4, 3, 3)})
    return {'meta': {'epoch': 12, 'dataset_meta': {'classes': ('a', 'b')}}, 'state_dict': detector,
            'message_hub': {}}


@pytest.mark.parametrize('arch,act_num', [(NARROW, 3), (NARROW_7, 4)])
@pytest.mark.parametrize('fmt', FORMATS)
def test_each_format_loads_with_identical_features(tmp_path, fmt, arch, act_num, log_lines):
    source = random_net(arch, act_num, seed=0)
    other = random_net(arch, act_num, seed=1).state_dict()
    path = save(wrap(fmt, source.state_dict(), other), tmp_path)
    net = pretrained_net(path, arch, act_num)
    assert_same_features(net, source)
    loaded = [line for line in log_lines if line.startswith('Loaded VanillaNet weights')]
    assert len(loaded) == 1 and f'act_num={act_num}' in loaded[0] and 'training structure' in loaded[0]
    if fmt == 'published':
        assert '(model_ema; also holds model; classifier dropped (9 tensors))' in loaded[0]


def test_deploy_structure_checkpoint_into_deploy_backbone(tmp_path):
    source = random_net(NARROW, 4, deploy=True)
    fused = with_classifier(source.state_dict(), deploy=True)
    path = save(published(fused, fused, act_num=4), tmp_path)
    net = pretrained_net(path, NARROW, 4, deploy=True)
    source_state = source.state_dict()
    assert all(torch.equal(value, source_state[k]) for k, value in net.state_dict().items())
    assert_same_features(net, source, exact=False)  # equal weights; 1x1 weight strides may pick other kernels


def test_model_ema_preferred_and_model_selectable(tmp_path):
    ema, model = random_net(seed=0), random_net(seed=1)
    path = save(published(with_classifier(ema.state_dict()), with_classifier(model.state_dict()), 3), tmp_path)
    assert_same_features(pretrained_net(path), ema)
    assert_same_features(pretrained_net(path, key='model'), model)
    with pytest.raises(VanillaNetWeightsError, match=r"no state dict under 'state_dict'.*'model', 'model_ema'"):
        pretrained_net(path, key='state_dict')
    only_model = save({'model': with_classifier(model.state_dict()), 'epoch': 299}, tmp_path, 'model.pth')
    assert_same_features(pretrained_net(only_model), model)


def test_mmengine_prefix_key(tmp_path):
    source = random_net()
    path = save({'state_dict': {'student.backbone.' + k: v for k, v in source.state_dict().items()}}, tmp_path)
    assert_same_features(pretrained_net(path, prefix='student.backbone'), source)


# ---- mismatches ---------------------------------------------------------------------------------


def test_act_num_mismatch_names_the_kernels(tmp_path):
    path = save(published(*[with_classifier(random_net(act_num=3).state_dict())] * 2, act_num=3), tmp_path)
    with pytest.raises(VanillaNetWeightsError) as error:
        pretrained_net(path, act_num=4)
    message = str(error.value)
    assert 'checkpoint has 7x7 activation kernels (act_num=3), the model has act_num=4' in message
    assert 'shape mismatches' in message and 'stem2.2.weight (8, 1, 7, 7) vs (8, 1, 9, 9)' in message
    assert 'allow_partial=True' in message


def test_deploy_checkpoint_into_training_backbone(tmp_path):
    path = save(random_net(deploy=True).state_dict(), tmp_path)
    with pytest.raises(VanillaNetWeightsError, match='this is a deploy-structure checkpoint; set deploy=True'):
        pretrained_net(path)


def test_training_checkpoint_into_deploy_backbone(tmp_path):
    path = save(random_net().state_dict(), tmp_path)
    with pytest.raises(VanillaNetWeightsError, match=r'set deploy=False .*tools/convert_weights\.py --deploy'):
        pretrained_net(path, deploy=True)


def meta_net(arch, act_num=4, deploy=False):
    with torch.device('meta'):
        return VanillaNet(arch=arch, act_num=act_num, deploy=deploy)


@pytest.mark.parametrize('ckpt_arch,model_arch,message', [
    ('vanillanet_9', 'vanillanet_13', 'checkpoint has 7 blocks (vanillanet_9), the model vanillanet_13 (11 blocks)'),
    ('vanillanet_13', 'vanillanet_5', 'checkpoint has 11 blocks (vanillanet_13), the model vanillanet_5 (3 blocks)'),
    ('vanillanet_13_x1_5', 'vanillanet_13', 'checkpoint widths [768, 768, 1536'),
])
def test_published_arch_mismatches_name_the_archs(ckpt_arch, model_arch, message):
    """Full-width archs on the meta device: shapes only, nothing materialised."""
    state_dict = meta_net(ckpt_arch).state_dict()
    with pytest.raises(VanillaNetWeightsError) as error:
        check_backbone_state_dict(meta_net(model_arch), state_dict, source='ckpt.pth')
    assert message in str(error.value)
    if 'widths' in message:
        assert '(vanillanet_13_x1_5 or vanillanet_13_x1_5_ada_pool)' in str(error.value)
        assert "differ from the model's [512, 512, 1024" in str(error.value)


@pytest.mark.parametrize('arch', sorted(ARCH_SETTINGS))
@pytest.mark.parametrize('deploy', [False, True])
def test_describe_every_published_arch(arch, deploy):
    info = describe_state_dict(meta_net(arch, act_num=3, deploy=deploy).state_dict())
    assert info.structure == ('deploy' if deploy else 'training')
    assert info.dims == ARCH_SETTINGS[arch]['dims'] and info.act_num == 3 and info.in_channels == 3
    assert arch in info.arch


def test_not_a_vanillanet_and_missing_key(tmp_path):
    path = save({'state_dict': {'conv1.weight': torch.randn(4, 3, 7, 7), 'layer1.0.bn1.weight': torch.ones(4)}},
                tmp_path)
    with pytest.raises(VanillaNetWeightsError, match='holds no VanillaNet weights'):
        pretrained_net(path)
    state_dict = random_net().state_dict()
    del state_dict['stages.1.act.bn.weight']
    path = save(state_dict, tmp_path, 'missing.pth')
    with pytest.raises(VanillaNetWeightsError, match=r"keys differ.*\n1 missing keys: stages\.1\.act\.bn\.weight"):
        pretrained_net(path)


def test_partial_load_is_explicit_and_lists_what_it_skipped(tmp_path, log_lines):
    source = random_net(act_num=3)
    path = save(source.state_dict(), tmp_path)
    net = pretrained_net(path, act_num=4, allow_partial=True)
    assert torch.equal(net.stem1[0].weight, source.stem1[0].weight)
    assert torch.equal(net.stages[2].conv2[1].running_var, source.stages[2].conv2[1].running_var)
    assert net.stages[0].act.weight.shape[-1] == 9
    assert any('Partial load' in line and 'act_num=3' in line for line in log_lines)
    skipped = '\n'.join(line for line in log_lines if 'skipped' in line)
    assert '5 shape mismatches' in skipped and 'stem2.2.weight (8, 1, 7, 7) vs (8, 1, 9, 9)' in skipped
    assert all(f'stages.{i}.act.weight' in skipped for i in range(4))
    summary = load_pretrained_backbone(VanillaNet(arch=NARROW, act_num=4), path, allow_partial=True)
    assert sorted(summary['skipped']) == sorted(['stem2.2.weight'] + [f'stages.{i}.act.weight' for i in range(4)])


def test_missing_local_checkpoint_builds_and_fails_at_init_weights_with_the_fix():
    """Building never reads the init_cfg file (a trained detector replaces every weight); initialising does."""
    net = VanillaNet(arch=NARROW, init_cfg=dict(type='Pretrained', checkpoint='/nowhere/vanillanet_13.pth'))
    with pytest.raises(FileNotFoundError) as error:
        net.init_weights()
    message = str(error.value)
    assert "'/nowhere/vanillanet_13.pth' does not exist" in message
    assert 'huawei-noah/VanillaNet' in message and 'releases' in message
    assert '--cfg-options model.backbone.init_cfg.checkpoint=/path/to/vanillanet_13_act_num_4_kd_pretrain.pth' \
        in message


@pytest.mark.parametrize('strict', [False, True])
def test_reference_idiom_load_state_dict_drops_the_classifier(tmp_path, strict, log_lines):
    """The reference code's backbone.load_state_dict(ckpt['model_ema'], strict=False) works: classifier dropped."""
    source = random_net()
    checkpoint = published(with_classifier(source.state_dict()), with_classifier(source.state_dict()), 3)
    net = VanillaNet(arch=NARROW, act_num=3, out_indices=range(4))
    result = net.load_state_dict(checkpoint['model_ema'], strict=strict)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_features(net, source)
    assert any('dropped the classifier' in line and '9 tensors' in line for line in log_lines)
    assert 'cls1.2.weight' in checkpoint['model_ema']  # the caller's dict is left alone


def test_strict_false_still_refuses_a_misfit_of_the_backbone_keys():
    wrong = random_net(act_num=2).state_dict()
    net = VanillaNet(arch=NARROW, act_num=3, out_indices=range(4))
    with pytest.raises(VanillaNetWeightsError, match=r'5x5 activation kernels \(act_num=2\)'):
        net.load_state_dict(with_classifier(wrong), strict=False)


def test_bad_init_cfg_keys_raise():
    with pytest.raises(ValueError, match=r"Unknown keys \['strict'\].*allowed: type, checkpoint, prefix"):
        VanillaNet(arch=NARROW, init_cfg=dict(type='Pretrained', checkpoint='x.pth', strict=True))


def test_other_init_cfg_entries_still_apply(tmp_path):
    source = random_net()
    path = save(source.state_dict(), tmp_path)
    net = VanillaNet(arch=NARROW, out_indices=range(4), init_cfg=[
        dict(type='Constant', layer='Conv2d', val=0.5), dict(type='Pretrained', checkpoint=path)])
    net.init_weights()
    assert_same_features(net, source)


# ---- converter ----------------------------------------------------------------------------------


def run_tool(*args):
    """``python tools/convert_weights.py *args``, its command line, in a process of its own: what it printed."""
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'convert_weights.py'), *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def run_main(capsys, *args):
    """The same tool's ``main``, in this process: what it printed."""
    capsys.readouterr()
    load_tool('convert_weights').main([str(a) for a in args])
    return capsys.readouterr().out


def test_convert_weights_output_loads(tmp_path, capsys):
    ema, model = random_net(NARROW_7, 4, seed=0), random_net(NARROW_7, 4, seed=1)
    src = save(published(with_classifier(ema.state_dict()), with_classifier(model.state_dict()), 4), tmp_path)
    out = run_tool(src, tmp_path / 'clean.pth')
    assert 'act_num=4 (9x9 activation kernels), training structure' in out
    assert '(model_ema; also holds model; classifier dropped (9 tensors))' in out and 'parameters:' in out
    clean = torch.load(tmp_path / 'clean.pth', weights_only=True)
    assert not any(k.startswith('cls') for k in clean['state_dict'])
    assert_same_features(pretrained_net(str(tmp_path / 'clean.pth'), NARROW_7, 4), ema)

    out = run_main(capsys, src, tmp_path / 'fused.pth', '--key', 'model', '--deploy')
    assert '(model; also holds model_ema;' in out and 'fused:      deploy structure' in out
    fused = pretrained_net(str(tmp_path / 'fused.pth'), NARROW_7, 4, deploy=True)
    assert_same_features(fused, model, exact=False)
