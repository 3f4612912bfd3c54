"""The VanillaNet backbone: archs, outputs, fusion, freezing, checkpointing, errors."""
import doctest
import math
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_detector import randomize_bn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdet.registry import MODELS

from mmdet_vanillanet.models import ARCH_SETTINGS, VanillaNet, onednn_inference

NARROW = dict(dims=[8, 16, 24, 24, 32], strides=[2, 2, 1, 2])


def narrow_net(**kwargs):
    kwargs.setdefault('arch', NARROW)
    kwargs.setdefault('act_num', 2)
    net = VanillaNet(**kwargs)
    net.init_weights()
    return net


# Published key patterns (the reference checkpoints' layout), without the classifier.
TRAIN_KEYS = [r'stem1\.[01]\.', r'stem2\.[01]\.', r'stem2\.2\.weight$', r'stem2\.2\.bn\.',
              r'stages\.\d+\.conv[12]\.[01]\.', r'stages\.\d+\.act\.weight$', r'stages\.\d+\.act\.bn\.']
DEPLOY_KEYS = [r'stem\.0\.(weight|bias)$', r'stem\.1\.(weight|bias)$', r'stages\.\d+\.conv\.(weight|bias)$',
               r'stages\.\d+\.act\.(weight|bias)$']


@pytest.mark.parametrize('arch', sorted(ARCH_SETTINGS))
def test_every_arch_outputs_and_published_key_layout(arch):
    dims, strides = ARCH_SETTINGS[arch]['dims'], ARCH_SETTINGS[arch]['strides']
    with torch.device('meta'):
        net = VanillaNet(arch=arch, act_num=4, out_indices=range(len(strides)))
        fused = VanillaNet(arch=arch, act_num=4, deploy=True)
    assert net.num_blocks == len(strides) == len(dims) - 1
    assert net.out_channels == dims[1:]
    stem_stride = 3 if 'ada_pool' in arch else 4
    assert net.out_strides == [stem_stride * math.prod(strides[:i + 1]) for i in range(len(strides))]
    for model, patterns in ((net, TRAIN_KEYS), (fused, DEPLOY_KEYS)):
        for key in model.state_dict():
            assert any(re.match(p, key) for p in patterns), f'{key} is not a published key'
    assert net.state_dict()['stages.0.act.weight'].shape == (dims[1], 1, 9, 9)
    assert fused.state_dict()['stem.0.weight'].shape == (dims[0], 3, 4, 4)


def test_vanillanet_13_detection_outputs_full_width():
    """The reference detection configs' out_indices give strides 4/8/16/32 with 512..4096 channels."""
    net = MODELS.build(dict(type='VanillaNet', arch='vanillanet_13', act_num=4, out_indices=(0, 1, 8, 10)))
    assert net.out_strides == [4, 8, 16, 32]
    assert net.out_channels == [512, 1024, 2048, 4096]
    x13 = VanillaNet(arch='vanillanet_13_x1_5', act_num=4, out_indices=(1, 8, 10))
    assert x13.out_channels == [1536, 3072, 6144] and x13.out_strides == [8, 16, 32]
    deploy_params = sum(p.numel() for p in VanillaNet(arch='vanillanet_13', act_num=4, deploy=True).parameters())
    train_params = sum(p.numel() for p in net.parameters())
    assert deploy_params < train_params


@pytest.mark.parametrize('size', [(32, 32), (67, 93), (96, 160)])
def test_forward_any_size_batch_and_layout(size):
    net = narrow_net(out_indices=(0, 1, 2, 3)).eval()
    x = torch.randn(2, 3, *size)
    outs = net(x)
    assert len(outs) == 4
    h, w = size
    expected_hw = []
    h, w = h // 4, w // 4
    for stride in NARROW['strides']:
        h, w = h // stride, w // stride
        expected_hw.append((h, w))
    assert [tuple(o.shape[-2:]) for o in outs] == expected_hw
    assert [o.shape[1] for o in outs] == NARROW['dims'][1:]
    with torch.no_grad():
        cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        ref = narrow_net(out_indices=(0, 1, 2, 3))
        ref.load_state_dict(net.state_dict())
        ref = ref.eval()(x)
    for a, b in zip(cl, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        bf16 = net(x)
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in bf16)


def test_ada_pool_matches_released_sizes_and_generalises():
    arch = dict(dims=[8] * 12, strides=ARCH_SETTINGS['vanillanet_13_x1_5_ada_pool']['strides'], ada_pool=[1, 2, 9])
    net = narrow_net(arch=arch, out_indices=(0, 1, 2, 9)).eval()
    outs = net(torch.randn(1, 3, 224, 224))
    assert [o.shape[-1] for o in outs] == [75, 38, 19, 10]
    outs = net(torch.randn(1, 3, 200, 331))
    # stem: floor((s + 2 - 4) / 3) + 1, then ceil(s / 2) at each adaptive block
    h, w = (200 - 2) // 3 + 1, (331 - 2) // 3 + 1
    assert tuple(outs[0].shape[-2:]) == (h, w)
    assert tuple(outs[1].shape[-2:]) == (math.ceil(h / 2), math.ceil(w / 2))


@settings(max_examples=12, deadline=None)
@given(
    widths=st.lists(st.integers(1, 12), min_size=2, max_size=5),
    stride_choice=st.lists(st.sampled_from([1, 2]), min_size=4, max_size=4),
    act_num=st.integers(1, 4),
    extra_height=st.integers(0, 40),
    extra_width=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_switch_to_deploy_is_exact(widths, stride_choice, act_num, extra_height, extra_width, seed):
    strides = stride_choice[:len(widths) - 1]
    arch = dict(dims=[4 * w for w in widths], strides=strides)
    generator = torch.Generator().manual_seed(seed)
    net = narrow_net(arch=arch, act_num=act_num, out_indices=range(len(strides)))
    randomize_bn(net, generator)
    net.eval()
    x = torch.randn(2, 3, net.min_input_size + extra_height, net.min_input_size + extra_width, generator=generator)
    with torch.no_grad():
        expected = net(x)
        net.switch_to_deploy()
        fused = net(x)
    assert net.deploy and not any(isinstance(m, _BatchNorm) for m in net.modules())
    assert all(p.is_contiguous() for p in net.parameters())
    for a, b in zip(fused, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-6)
    built = VanillaNet(arch=arch, act_num=act_num, out_indices=range(len(strides)), deploy=True)
    built.load_state_dict(net.state_dict())  # switched == built-in-deploy-form, key for key


def test_switch_to_deploy_inside_detector():
    cfg = dict(
        type='RetinaNet',
        data_preprocessor=dict(type='DetDataPreprocessor', mean=[0, 0, 0], std=[1, 1, 1], pad_size_divisor=32),
        backbone=dict(type='VanillaNet', arch=NARROW, act_num=2, out_indices=(1, 2, 3)),
        neck=dict(type='FPN', in_channels=[24, 24, 32], out_channels=16, start_level=0, num_outs=3),
        bbox_head=dict(type='RetinaHead', num_classes=3, in_channels=16, feat_channels=16, stacked_convs=1,
                       anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4, scales_per_octave=1,
                                             ratios=[1.0], strides=[8, 16, 16]),
                       bbox_coder=dict(type='DeltaXYWHBBoxCoder'),
                       loss_cls=dict(type='FocalLoss', use_sigmoid=True, loss_weight=1.0),
                       loss_bbox=dict(type='L1Loss')))
    from mmdet.utils import register_all_modules

    import mmdet_vanillanet  # noqa: F401
    register_all_modules()
    detector = MODELS.build(cfg)
    detector.init_weights()
    randomize_bn(detector.backbone, torch.Generator().manual_seed(0))
    detector.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        before = detector._forward(x)
        detector.backbone.switch_to_deploy()
        after = detector._forward(x)
    for a, b in zip(torch.utils._pytree.tree_leaves(after), torch.utils._pytree.tree_leaves(before)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_switch_to_deploy_refuses_unfinished_deep_training():
    net = narrow_net()
    net.act_learn = 0.5
    assert all(block.act_learn == 0.5 for block in net.stages)
    with pytest.raises(RuntimeError, match=r'act_learn=0\.5.*set backbone\.act_learn = 1'):
        net.switch_to_deploy()


def test_act_learn_zero_is_relu_between_convs():
    net = narrow_net(out_indices=(0,)).eval()
    net.act_learn = 0.0
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        stem = net.stem2(torch.relu(net.stem1(x)))
        block = net.stages[0]
        expected = block.act(block.pool(block.conv2(torch.relu(block.conv1(stem)))))
        torch.testing.assert_close(net(x)[0], expected)


def test_from_scratch_init():
    net = VanillaNet(arch=dict(dims=[64, 128], strides=[2]), act_num=3)
    net.init_weights()
    weight = net.stages[0].conv1[0].weight
    assert abs(weight.std().item() - 0.02) < 0.002 and abs(weight.mean().item()) < 0.002
    assert abs(net.stages[0].act.weight.std().item() - 0.02) < 0.004
    assert torch.count_nonzero(net.stages[0].conv1[0].bias) == 0
    assert torch.all(net.stem1[1].weight == 1) and net.stem1[1].eps == 1e-6


def test_every_norm_uses_eps_1e6():
    net = narrow_net(norm_cfg=dict(type='BN'))
    assert {m.eps for m in net.modules() if isinstance(m, _BatchNorm)} == {1e-6}


@pytest.mark.parametrize('frozen_stages', [0, 2])
def test_frozen_stages_get_no_gradients_and_keep_statistics(frozen_stages):
    net = narrow_net(frozen_stages=frozen_stages, out_indices=(3,))
    net.train()
    frozen = [net.stem1, net.stem2] + list(net.stages[:frozen_stages])
    trainable = list(net.stages[frozen_stages:])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net(torch.randn(2, 3, 64, 64))[0].sum().backward()
    for module in frozen:
        assert not module.training
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    for name, value in net.state_dict().items():
        in_frozen = name.startswith(('stem', *[f'stages.{i}.' for i in range(frozen_stages)]))
        if in_frozen:
            assert torch.equal(value, before[name]), name
    assert all(p.grad is not None for m in trainable for p in m.parameters())
    last = f'stages.{net.num_blocks - 1}.act.bn.running_mean'
    assert not torch.equal(net.stages[-1].act.bn.running_mean, before[last])


def test_norm_eval_keeps_every_bn_in_eval_mode():
    net = narrow_net(norm_eval=True).train()
    assert all(not m.training for m in net.modules() if isinstance(m, _BatchNorm))
    assert net.stages[0].training


def test_with_cp_same_outputs_gradients_and_statistics():
    torch.manual_seed(0)
    plain = narrow_net(out_indices=(1, 3)).train()
    checkpointed = narrow_net(out_indices=(1, 3), with_cp=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    outputs = []
    for net in (plain, checkpointed):
        inp = x.clone().requires_grad_()
        outs = net(inp)
        sum(o.square().sum() for o in outs).backward()
        outputs.append((outs, inp.grad, {n: p.grad for n, p in net.named_parameters()}, net.state_dict()))
    (outs_a, gin_a, grads_a, state_a), (outs_b, gin_b, grads_b, state_b) = outputs
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(gin_a, gin_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], msg=name)


@pytest.mark.parametrize('kwargs, kind, message', [
    (dict(arch='vanillanet_14'), ValueError,
     r"^Unknown VanillaNet arch 'vanillanet_14'; valid names: vanillanet_5, .*vanillanet_13_x1_5_ada_pool"),
    (dict(arch=dict(dims=[8, 16], strides=[2, 2])), ValueError, r'len\(dims\) == len\(strides\) \+ 1'),
    (dict(arch=dict(dims=[8, 16], strides=[2], ada_pol=[0])), ValueError, r"^Unknown keys \['ada_pol'\]"),
    (dict(arch=dict(dims=[8, 16, 16], strides=[2, 1], ada_pool=[1])), ValueError,
     r'ada_pool blocks \[1\] must be indices of stride-2'),
    (dict(out_indices=(0, 4)), ValueError, r'in \[0, 3\]'),
    (dict(out_indices=(1, 1)), ValueError, r'strictly increasing'),
    (dict(out_indices=(2, 1)), ValueError, r'strictly increasing'),
    (dict(frozen_stages=5), ValueError, r'frozen_stages must be an int in \[-1, 4\]'),
    (dict(act_num=0), ValueError, r'act_num must be an integer >= 1'),
    (dict(act_num=None), TypeError, r'act_num must be an integer >= 1 .*got None'),
    (dict(act_num='3'), TypeError, r"act_num must be an integer >= 1 .*got '3'"),
    (dict(norm_cfg=None), TypeError, r"norm_cfg must be a dict such as dict\(type='BN', eps=1e-6\), got None"),
    (dict(norm_cfg=dict(eps=1e-6)), ValueError, r"norm_cfg needs a 'type'"),
])
def test_bad_arguments_raise_clear_errors(kwargs, kind, message):
    with pytest.raises(Exception, match=message) as error:
        narrow_net(**kwargs)
    assert type(error.value) is kind


def test_bad_inputs_raise_clear_errors():
    net = narrow_net().eval()
    with pytest.raises(ValueError, match=r'at least 32 pixels'):
        net(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match=r'expects images of shape \(N, 3, H, W\).*convert 1- or 4-channel'):
        net(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r'act_learn must lie in \[0, 1\]'):
        net.act_learn = 1.5


# ---- the oneDNN fast path of the fused backbone ---------------------------------------------------------

def fused_random_net(scale=0.3):
    """A fused narrow net with well-scaled random weights: every output far from zero."""
    torch.manual_seed(0)
    net = VanillaNet(arch=dict(dims=[8, 20, 24, 24, 40], strides=[2, 1, 2, 2]), act_num=2, out_indices=(0, 1, 2, 3))
    net.init_weights()
    for p in net.parameters():
        p.data.normal_(0, scale)
    net.eval().switch_to_deploy()
    return net


def count_fast_path_calls(monkeypatch):
    used = []
    fused_forward = onednn_inference.fused_forward
    monkeypatch.setattr(onednn_inference, 'fused_forward', lambda *args: used.append(1) or fused_forward(*args))
    return used


@pytest.mark.parametrize('size', [(64, 64), (77, 101)])
def test_fast_inference_path_equals_plain_path(size, monkeypatch):
    net = fused_random_net()
    x = torch.randn(2, 3, *size)
    used = count_fast_path_calls(monkeypatch)
    with torch.no_grad():
        fast = net(x)
        net.fast_inference = False
        plain = net(x)
    assert used == [1]
    for a, b in zip(fast, plain):
        assert a.shape == b.shape and a.is_contiguous() and b.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    net.fast_inference = True
    net(x)  # gradients enabled: the plain path
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16):
        assert net(x)[0].dtype == torch.float16  # fp16 autocast: the plain path
    assert used == [1]


def test_forward_hooks_on_a_block_fire_and_see_the_plain_path(monkeypatch):
    """Grad-CAM and feature probes hook stages.N: the fast path skips the submodules, so it steps aside."""
    net = fused_random_net()
    used = count_fast_path_calls(monkeypatch)
    seen = []
    handle = net.stages[2].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 64, 64))
    assert seen == [outs[2].shape] and used == []
    handle.remove()
    with torch.no_grad():
        net(torch.randn(1, 3, 64, 64))
    assert used == [1]


def test_a_failing_probe_turns_the_fast_path_off_once_with_a_warning(monkeypatch):
    """A torch build whose private oneDNN op takes other arguments: probed once, plain path from then on."""
    net = fused_random_net()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)
    onednn_inference.fast_path_works.cache_clear()

    def changed_signature(*args):
        raise RuntimeError('mkldnn::_convolution_pointwise() expected at most 9 argument(s) but received 10')

    monkeypatch.setattr(torch.ops.mkldnn, '_convolution_pointwise', changed_signature)
    try:
        with pytest.warns(UserWarning, match='oneDNN fast path is off in this process: its ops failed'):
            with torch.no_grad():
                outs = net(x)
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # no second warning: the probe ran once
            with torch.no_grad():
                net(x)
    finally:
        onednn_inference.fast_path_works.cache_clear()
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_error_during_fast_inference_is_not_swallowed(monkeypatch):
    net = fused_random_net()
    assert onednn_inference.fast_path_works(torch.float32)

    def broken(x, size):
        raise RuntimeError('out of memory in mkldnn_max_pool2d')

    monkeypatch.setattr(onednn_inference._Blocked, 'max_pool', staticmethod(broken))
    with pytest.raises(RuntimeError, match='out of memory'), torch.no_grad():
        net(torch.randn(1, 3, 64, 64))
    assert net.fast_inference


def test_the_docstring_example_runs_as_written():
    from mmdet_vanillanet.models import vanillanet
    result = doctest.testmod(vanillanet, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 4 and result.failed == 0
