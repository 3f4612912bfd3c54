"""Reduced precision on CPUs: bf16 (autocast) and int8 (PT2E) against fp32, for the backbone and whole detectors.

bf16 runs on every CPU (where it is not native, torch and oneDNN emulate it: slow, exact enough on small
inputs), so these tests need no particular machine. Tolerances are relative to each output's largest value
(:func:`relative_deviation`): bf16 keeps 8 significant bits (rounding 2**-9 = 0.2% per op), int8 256 levels
per tensor.
"""
import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from test_layout import ZOO, batch, build_pair, fixed_proposals, record_op_inputs

import mmdet_vanillanet  # noqa: F401  (registration)
from mmdet_vanillanet import cpu_support
from mmdet_vanillanet.detectors import build_detector, fuse_vanillanets
from mmdet_vanillanet.models import VanillaNet, onednn_inference
from mmdet_vanillanet.models.execution import Execution, choose_execution
from mmdet_vanillanet.output_comparison import detector_outputs, random_batch, relative_deviation
from mmdet_vanillanet.precision import (
    Fp32PostprocessHook,
    add_fp32_borders,
    bf16_inference,
    channels_last,
    quantize_vanillanet,
)

BF16_TOLERANCE = 3e-2   # backbone and detector outputs, bf16 against fp32
INT8_TOLERANCE = 0.15   # backbone outputs, int8 against fp32 (random weights: a harder case than trained ones)
DEMO_CONFIGS = {'retinanet': 'configs/demo/retinanet_vanillanet_demo.py',
                'mask-rcnn': 'configs/demo/mask-rcnn_vanillanet_demo.py'}


def fused_net(out_indices=(0, 1, 2, 3), seed=0):
    torch.manual_seed(seed)
    net = VanillaNet(arch=dict(dims=[16, 32, 48, 48, 64], strides=[2, 1, 2, 2]), act_num=2, out_indices=out_indices)
    net.init_weights()
    for module in net.modules():  # well-scaled random weights and statistics: every output far from zero
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 1.5)
            module.running_mean.normal_(0, 0.1)
    net.eval().switch_to_deploy()
    return net


def autocast_bf16():
    return torch.autocast('cpu', dtype=torch.bfloat16)


# ---- the backbone's choice of how to run ---------------------------------------------------------------

def test_the_backbone_chooses_its_execution_from_the_state_it_is_called_in():
    net = fused_net()
    x = torch.randn(1, 3, 64, 64)
    assert choose_execution(net, x) is Execution.PLAIN  # gradients enabled
    with torch.no_grad():
        assert choose_execution(net, x) is Execution.ONEDNN_FP32
        with autocast_bf16():
            assert choose_execution(net, x) is Execution.ONEDNN_BF16
            assert choose_execution(net, x.bfloat16()) is Execution.ONEDNN_BF16
        with torch.autocast('cpu', dtype=torch.float16):
            assert choose_execution(net, x) is Execution.PLAIN
        handle = net.stages[0].register_forward_hook(lambda *args: None)
        with autocast_bf16():
            assert choose_execution(net, x) is Execution.PLAIN  # hooks see the plain path
        handle.remove()
        net.fast_inference = False
        with autocast_bf16():
            assert choose_execution(net, x) is Execution.PLAIN
        training = VanillaNet(arch=dict(dims=[8, 16], strides=[2]), act_num=1).eval()
        assert choose_execution(training, x) is Execution.PLAIN


def test_bf16_path_matches_fp32_and_runs_in_bf16(monkeypatch):
    net = fused_net()
    x = torch.randn(2, 3, 96, 128)
    calls = []
    fused_forward = onednn_inference.fused_forward
    monkeypatch.setattr(onednn_inference, 'fused_forward',
                        lambda net, x, dtype, *rest: calls.append(dtype) or fused_forward(net, x, dtype, *rest))
    with torch.no_grad():
        reference = net(x)
        with autocast_bf16():
            outs = net(x)
            net.channels_last_outputs = True
            kept = net(x)  # the same maps, without the copy to NCHW
            net.channels_last_outputs = False
        net.fast_inference = False
        with autocast_bf16():
            plain = net(x)  # torch's own autocast path: the independent bf16 reference
    assert calls == [torch.float32, torch.bfloat16, torch.bfloat16]
    for out, out_kept in zip(outs, kept):
        assert out.dtype == torch.bfloat16 and out.is_contiguous()
        assert out_kept.is_contiguous(memory_format=torch.channels_last) and not out_kept.is_contiguous()
        assert torch.equal(out_kept, out)
    assert relative_deviation(reference, outs)['max_rel'] < BF16_TOLERANCE
    assert relative_deviation(plain, outs)['max_rel'] < BF16_TOLERANCE
    assert relative_deviation(reference, plain)['max_rel'] < BF16_TOLERANCE


def test_bf16_weights_are_converted_once_and_follow_weight_changes():
    net = fused_net()
    first = onednn_inference.weights_in(net, torch.bfloat16)
    # bf16 values: bf16 tensors, or fp32 ones in the depthwise kernel's layout, rounded as autocast rounds them
    assert all(w.dtype == torch.bfloat16 or torch.equal(w, w.bfloat16().float()) for w in first)
    assert any(w.dtype == torch.bfloat16 for w in first)
    assert onednn_inference.weights_in(net, torch.bfloat16) is first  # cached, not converted per call
    assert not any('onednn' in key for key in net.state_dict())  # the cache is not part of the weights
    state = {k: v * 2 for k, v in net.state_dict().items()}
    net.load_state_dict(state)  # in place: the version counters move
    second = onednn_inference.weights_in(net, torch.bfloat16)
    assert second is not first
    torch.testing.assert_close(second[0], (first[0].float() * 2).bfloat16())  # the stem conv's weight
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), autocast_bf16():
        after = net(x)
    with torch.no_grad():
        reference = net(x)
    assert relative_deviation(reference, after)['max_rel'] < BF16_TOLERANCE


def test_without_native_bf16_the_backbone_says_so_once(monkeypatch):
    monkeypatch.setenv(cpu_support.NO_NATIVE_ENV, 'bf16')
    cpu_support.warn_once.cache_clear()
    net = fused_net()
    x = torch.randn(1, 3, 64, 64)
    with pytest.warns(UserWarning, match='no native bf16 on this CPU'):
        with torch.no_grad(), autocast_bf16():
            net(x)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with torch.no_grad(), autocast_bf16():
            net(x)
    cpu_support.warn_once.cache_clear()


def test_native_support_can_be_forced_off_and_a_wrong_name_is_refused(monkeypatch):
    monkeypatch.setenv(cpu_support.NO_NATIVE_ENV, 'bf16,int8')
    assert not cpu_support.native_bf16() and not cpu_support.native_int8()
    assert 'native bf16: no' in cpu_support.describe()
    monkeypatch.setenv(cpu_support.NO_NATIVE_ENV, 'fp8')
    with pytest.raises(ValueError, match='comma-separated subset of bf16, int8'):
        cpu_support.native_bf16()


# ---- whole detectors under bf16 autocast ----------------------------------------------------------------

def demo_detector(name):
    cfg = Config.fromfile(DEMO_CONFIGS[name])
    test_cfg = cfg.model.test_cfg.get('rcnn', cfg.model.test_cfg)
    test_cfg.score_thr = 0.0  # random weights score low: keep every box, so that NMS has work
    torch.manual_seed(0)
    model = build_detector(cfg.model, init_weights=True)
    fuse_vanillanets(model)
    return model


@pytest.mark.parametrize('name', DEMO_CONFIGS)
def test_demo_detectors_without_fp32_borders_crash_in_mmcv_under_autocast(name):
    """What the borders fix: mmcv's CPU NMS / RoIAlign take fp32 only."""
    model = demo_detector(name)
    inputs, samples = random_batch(model, (128, 128), num_images=1)
    with torch.no_grad(), autocast_bf16(), pytest.raises(RuntimeError, match='Float|float|BFloat16|same dtype'):
        model.predict(inputs, samples)


@pytest.mark.parametrize('name', DEMO_CONFIGS)
def test_demo_detectors_run_whole_in_bf16_and_agree_with_fp32(name):
    model = demo_detector(name)
    inputs, samples = random_batch(model, (128, 160), num_images=2)
    reference, proposals = detector_outputs(model, inputs, samples)
    with torch.no_grad():
        expected = model.predict(inputs, copy.deepcopy(samples))
    with bf16_inference(model, allow_emulated=True):
        assert torch.is_autocast_enabled('cpu')
        outputs, _ = detector_outputs(model, inputs, samples, proposals)
        with torch.no_grad():
            predicted = model.predict(inputs, copy.deepcopy(samples))
    assert not torch.is_autocast_enabled('cpu')
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # borders removed
    assert relative_deviation(reference, outputs)['max_rel'] < BF16_TOLERANCE
    for fp32, bf16 in zip(expected, predicted):
        assert bf16.pred_instances.bboxes.dtype == torch.float32
        assert len(bf16.pred_instances) == len(fp32.pred_instances) > 0
        # the best detection of each image: same box up to a pixel, same score up to bf16 rounding
        torch.testing.assert_close(bf16.pred_instances.scores[0], fp32.pred_instances.scores[0], rtol=0.05, atol=0.01)
        torch.testing.assert_close(bf16.pred_instances.bboxes[0], fp32.pred_instances.bboxes[0], rtol=0, atol=1.5)
        if 'masks' in fp32.pred_instances:
            assert bf16.pred_instances.masks.shape == fp32.pred_instances.masks.shape


def conv_weight_layouts(model):
    return {name: m.weight.is_contiguous() for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def neck_outputs_channels_last(model):
    seen = []
    neck = model.neck[0] if isinstance(model.neck, torch.nn.Sequential) else model.neck  # FPN or ChannelMapper
    handle = neck.register_forward_hook(
        lambda module, args, outs: seen.extend(o.is_contiguous(memory_format=torch.channels_last) for o in outs))
    return seen, handle


# deformable convs whose offsets the head computes in bf16 (8 significant bits): the sampling points move, and
# random heads amplify that to 0.2-0.8 of the outputs' scale (with NCHW maps just the same)
BF16_SENSITIVE = ('reppoints', 'atss-dyhead')


@pytest.mark.parametrize('name', ZOO)
def test_zoo_detectors_run_whole_in_bf16_channels_last_with_nchw_maps_for_mmcv(name):
    """mmdet's zoo (RoIAlign, deformable convs, DCNv2, deformable attention) under :func:`bf16_inference`: neck
    and heads channels-last, every layout-sensitive mmcv op fed NCHW-contiguous maps, fp32's outputs."""
    config, out_indices, compared = ZOO[name]
    model, _ = build_pair(config, out_indices)
    fuse_vanillanets(model)
    weights_before = conv_weight_layouts(model)
    inputs, samples = batch()
    proposals = fixed_proposals(samples) if compared == 'roi' else None
    reference, _ = detector_outputs(model, inputs, samples, proposals)
    with bf16_inference(model, allow_emulated=True, channels_last=False):
        nchw, _ = detector_outputs(model, inputs, samples, proposals)
    with bf16_inference(model, allow_emulated=True):
        op_inputs = record_op_inputs(model)
        neck_layouts, handle = neck_outputs_channels_last(model)
        outputs, _ = detector_outputs(model, inputs, samples, proposals)
        handle.remove()
        with torch.no_grad():
            predicted = model.predict(inputs, copy.deepcopy(samples))
    assert neck_layouts and all(neck_layouts)  # the speed-up is on
    assert op_inputs and all(nchw for _, nchw in op_inputs), op_inputs
    assert all(p.pred_instances.bboxes.dtype == torch.float32 for p in predicted)
    assert all(torch.isfinite(p.pred_instances.scores).all() for p in predicted)
    assert relative_deviation(nchw, outputs)['max_rel'] < BF16_TOLERANCE  # bf16 both, in another layout
    if name not in BF16_SENSITIVE:
        assert relative_deviation(reference, outputs)['max_rel'] < 0.1  # deep random heads: bf16 errors add up
    assert conv_weight_layouts(model) == weights_before  # NCHW weights again after the block
    assert not any(m.channels_last_outputs for m in model.modules() if isinstance(m, VanillaNet))


def test_without_nchw_maps_for_mmcv_a_channels_last_detector_pools_scrambled_roi_features(monkeypatch):
    """What the guard of mmcv's ops prevents: RoIAlign reading channels-last FPN maps as NCHW."""
    config, out_indices, _ = ZOO['faster-rcnn']
    model, _ = build_pair(config, out_indices)
    fuse_vanillanets(model)
    inputs, samples = batch()
    proposals = fixed_proposals(samples)
    reference, _ = detector_outputs(model, inputs, samples, proposals)
    monkeypatch.setattr(channels_last, 'is_mmcv_op', lambda module: False)
    with bf16_inference(model, allow_emulated=True):
        outputs, _ = detector_outputs(model, inputs, samples, proposals)
    assert relative_deviation(reference, outputs)['max_rel'] > 0.3


@pytest.mark.parametrize('size', [(12, 16), (9, 12), (7, 8)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_channels_last_max_pool_equals_torchs(size, dtype):
    x = torch.randn(2, 5, *size).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 0], x[1, 2, 1, 1] = float('nan'), float('-inf')
    for kernel in (2, 3):
        expected = torch.nn.functional.max_pool2d(x, kernel)
        got = onednn_inference.channels_last_max_pool(x, kernel)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_fp32_borders_cast_heads_outputs_and_roi_extractor_inputs():
    model = demo_detector('mask-rcnn')
    handles = add_fp32_borders(model)
    kinds = sorted({type(h).__name__ for h in handles})
    hooked = sorted(name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks)
    assert hooked == ['roi_head.bbox_head', 'roi_head.bbox_roi_extractor', 'roi_head.mask_head',
                      'roi_head.mask_roi_extractor', 'rpn_head'], (hooked, kinds)
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize('channels_last', [True, False])
def test_fp32_postprocess_hook_runs_the_loop_channels_last_and_restores_the_model(channels_last):
    model = demo_detector('mask-rcnn')
    before = conv_weight_layouts(model)
    runner = SimpleNamespace(model=model, test_loop=SimpleNamespace(fp16=True))
    hook = Fp32PostprocessHook(channels_last=channels_last)
    hook.before_test(runner)
    during = conv_weight_layouts(model)
    assert model.roi_head.mask_roi_extractor._forward_pre_hooks  # the fp32 borders are on either way
    assert (model.neck.fpn_convs[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
            and not model.neck.fpn_convs[0].conv.weight.is_contiguous()) == channels_last
    assert model.backbone.channels_last_outputs == channels_last
    assert all(during[name] for name in during if name.startswith('backbone.'))  # VanillaNet keeps its own
    hook.after_test(runner)
    assert conv_weight_layouts(model) == before and not model.backbone.channels_last_outputs
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ---- int8 ----------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def int8_pair():
    net = fused_net(out_indices=(1, 3))
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(1, 3, 64, 96, generator=generator) for _ in range(4)]
    return net, images, quantize_vanillanet(net, calibration_inputs=images)


def test_int8_backbone_matches_fp32_on_other_images_and_sizes(int8_pair):
    net, _, int8 = int8_pair
    assert (int8.out_channels, int8.out_strides) == (net.out_channels, net.out_strides)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for size in ((64, 96), (96, 64)):  # one exported program, any multiple of the stride
            x = torch.randn(1, 3, *size, generator=generator)
            outs = int8(x)
            assert [o.shape for o in outs] == [r.shape for r in net(x)]
            assert relative_deviation(net(x), outs)['max_rel'] < INT8_TOLERANCE


def test_int8_differs_from_fp32_and_is_rebuilt_exactly_from_its_calibration(int8_pair, tmp_path):
    from mmdet_vanillanet.precision import load_calibration, save_calibration
    net, _, int8 = int8_pair
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference, outs = net(x), int8(x)
    assert relative_deviation(reference, outs)['max_rel'] > 1e-4  # really quantized, not the fp32 net
    path = tmp_path / 'calibration.pth'
    save_calibration(path, {'backbone': int8}, dict(num_images=4))
    data = load_calibration(path)
    rebuilt = quantize_vanillanet(net, calibration=data['backbones']['backbone'])
    with torch.no_grad():
        # the quantized graphs (int8 weights, scales, zero points) are identical: the same numbers, bit for bit
        for a, b in zip(int8.quantized(x), rebuilt.quantized(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # compiled, they may differ by rounding where inductor's kernels for other shapes fuse differently
        assert relative_deviation(outs, rebuilt(x))['max_rel'] < 1e-2


def test_int8_refuses_bad_inputs(int8_pair):
    net, images, int8 = int8_pair
    with torch.no_grad(), pytest.raises(ValueError, match='multiples of 32.*pad_size_divisor'):
        int8(torch.randn(1, 3, 64, 80))
    with pytest.raises(RuntimeError, match='without gradients'):
        int8(images[0])
    with pytest.raises(RuntimeError, match='inference only'):
        int8.train()
    other = fused_net(out_indices=(3,))
    with pytest.raises(ValueError, match='does not fit this backbone'):
        quantize_vanillanet(other, calibration=int8.calibration)
    with pytest.raises(ValueError, match='either calibration_inputs'):
        quantize_vanillanet(net)
