"""The compiled CPU kernels (mmdet_vanillanet/csrc/) against torch's own ops, and the fused backbone on them.

The depthwise kernel is compared with ``F.conv2d`` in fp32 on the same (bf16-rounded) values: both sum in fp32,
so after rounding to bf16 they may differ by one bf16 step (2**-7 relative) where the sum lies near a rounding
boundary, and by fp32 summation-order noise near zero. The layout copy is compared bit for bit.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from mmdet_vanillanet.models import VanillaNet, cpu_kernels, onednn_inference
from mmdet_vanillanet.output_comparison import relative_deviation

needs_depthwise = pytest.mark.skipif(not cpu_kernels.depthwise_runs(9),
                                     reason='the depthwise kernel needs AVX-512 with AVX512_BF16')


def channels_last(*shape, dtype=torch.bfloat16, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def depthwise_case(n, c, h, w, k, dtype=torch.bfloat16):
    x = channels_last(n, c, h, w, dtype=dtype)
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(c, 1, k, k, generator=generator) / k).to(dtype)
    bias = torch.randn(c, generator=generator).to(dtype)
    out = cpu_kernels.depthwise_conv(x, *cpu_kernels.depthwise_weights(weight, bias, dtype))
    reference = F.conv2d(x.float(), weight.float(), bias.float(), padding=k // 2, groups=c)
    return x, out, reference


def assert_same_up_to_rounding(out, reference, dtype):
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    rtol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), reference, rtol=rtol, atol=1e-5 * float(reference.abs().max()))


@needs_depthwise
@pytest.mark.parametrize('n, c, h, w, k', [
    (1, 16, 12, 16, 9),     # one vector, one tile
    (2, 40, 7, 9, 9),       # channel tail (40 = 2 x 16 + 8), a row narrower than a tile, batch
    (1, 32, 20, 37, 9),     # the last tile overlapping the one before it
    (1, 48, 5, 3, 7),       # fewer rows and columns than the kernel
    (1, 16, 70, 33, 3),     # bands of rows (32 per task)
    (1, 512, 3, 240, 9),    # strips of columns (the ring holds ~100 of them for 16 vectors)
    (2, 600, 9, 17, 13),    # groups of vectors with a tail, the largest kernel
    (1, 24, 11, 21, 5),
    (1, 8, 4, 4, 11),
])
def test_depthwise_kernel_equals_conv2d(n, c, h, w, k):
    _, out, reference = depthwise_case(n, c, h, w, k)
    assert_same_up_to_rounding(out, reference, torch.bfloat16)


@needs_depthwise
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
@pytest.mark.parametrize('n, c, h, w, k', [(1, 40, 14, 38, 9), (2, 512, 6, 480, 9), (1, 16, 9, 7, 5), (1, 24, 3, 5, 3)])
def test_depthwise_kernel_takes_the_2x2_max_pool_on_the_way_in(n, c, h, w, k, dtype):
    x = channels_last(n, c, h, w, dtype=dtype)
    x[0, 1, 0, 1] = float('nan')  # pools to (0, 0): NaN propagates as in F.max_pool2d
    generator = torch.Generator().manual_seed(1)
    weight, bias = (torch.randn(c, 1, k, k, generator=generator) / k).to(dtype), torch.randn(c).to(dtype)
    out = cpu_kernels.depthwise_conv(x, *cpu_kernels.depthwise_weights(weight, bias, dtype), pool=2)
    pooled = F.max_pool2d(x.float(), 2)  # odd sides floored
    reference = F.conv2d(pooled, weight.float(), bias.float(), padding=k // 2, groups=c)
    assert out.shape == reference.shape
    assert torch.equal(out.isnan(), reference.isnan()) and out.isnan().any()
    finite = ~reference.isnan()
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    rtol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float()[finite], reference[finite], rtol=rtol,
                               atol=1e-5 * float(reference[finite].abs().max()))


@needs_depthwise
def test_depthwise_kernel_runs_fp32_maps_in_fp32():
    _, out, reference = depthwise_case(2, 40, 10, 19, 9, dtype=torch.float32)
    assert_same_up_to_rounding(out, reference, torch.float32)


@needs_depthwise
def test_depthwise_kernel_propagates_nan_and_inf_as_conv2d_does():
    x = channels_last(1, 16, 20, 20)
    x[0, 3, 10, 10] = float('nan')
    x[0, 5, 2, 15] = float('inf')
    weight = torch.rand(16, 1, 9, 9).bfloat16() + 0.1  # positive: inf stays inf
    bias = torch.zeros(16).bfloat16()
    out = cpu_kernels.depthwise_conv(x, *cpu_kernels.depthwise_weights(weight, bias, torch.bfloat16)).float()
    reference = F.conv2d(x.float(), weight.float(), bias.float(), padding=4, groups=16)
    assert torch.equal(out.isnan(), reference.isnan()) and out.isnan().sum() == 81
    assert torch.equal(out.isinf(), reference.isinf()) and out.isinf().sum() > 0


@needs_depthwise
def test_depthwise_kernel_refuses_what_it_cannot_compute():
    weights = cpu_kernels.depthwise_weights(torch.randn(16, 1, 9, 9), torch.randn(16), torch.bfloat16)
    with pytest.raises(RuntimeError, match='channels-last'):
        cpu_kernels.depthwise_conv(torch.randn(1, 16, 8, 8).bfloat16(), *weights)  # NCHW memory
    with pytest.raises(RuntimeError, match='bf16 or fp32'):
        cpu_kernels.depthwise_conv(channels_last(1, 16, 8, 8, dtype=torch.float16), *weights)
    with pytest.raises(RuntimeError, match=r'weight must be contiguous fp32 \(K, K, C\) with C = 24'):
        cpu_kernels.depthwise_conv(channels_last(1, 24, 8, 8), *weights)
    even = cpu_kernels.depthwise_weights(torch.randn(16, 1, 4, 4), torch.randn(16), torch.bfloat16)
    with pytest.raises(RuntimeError, match='kernel size 4'):
        cpu_kernels.depthwise_conv(channels_last(1, 16, 8, 8), *even)
    empty = cpu_kernels.depthwise_conv(channels_last(1, 16, 1, 8), *weights, pool=2)  # as F.max_pool2d: no rows
    assert empty.shape == (1, 16, 0, 4)
    with pytest.raises(RuntimeError, match='pool must be 1'):
        cpu_kernels.depthwise_conv(channels_last(1, 16, 8, 8), *weights, pool=3)


@pytest.mark.skipif(not cpu_kernels.loaded(), reason='the compiled kernels are not built')
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32, torch.int32])
@pytest.mark.parametrize('shape', [(1, 1024, 10, 12), (2, 3, 5, 7), (1, 65, 1, 17), (3, 130, 4, 1)])
def test_layout_copy_equals_contiguous_bit_for_bit(shape, dtype):
    x = torch.randn(*shape).mul(100).to(dtype).contiguous(memory_format=torch.channels_last)
    out = cpu_kernels.contiguous(x)
    assert out.is_contiguous() and torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr() or x.is_contiguous()


def test_layout_copy_leaves_other_tensors_to_torch():
    nchw = torch.randn(1, 4, 5, 6)
    assert cpu_kernels.contiguous(nchw) is nchw
    grad = torch.randn(1, 4, 5, 6, requires_grad=True).contiguous(memory_format=torch.channels_last)
    out = cpu_kernels.contiguous(grad)
    assert out.grad_fn is not None and out.is_contiguous()  # torch's copy, which autograd follows


def test_missing_or_broken_kernels_warn_and_report_false(tmp_path):
    with pytest.warns(UserWarning, match='compiled CPU kernels .* are missing'):
        assert not cpu_kernels.load_from(tmp_path)
    (tmp_path / '_cpu_kernels.cpython-311-x86_64-linux-gnu.so').write_bytes(b'not a shared library')
    with pytest.warns(UserWarning, match='do not load into this torch'):
        assert not cpu_kernels.load_from(tmp_path)


# ---- the fused backbone on the kernels ----------------------------------------------------------------

def fused_backbone(strides=(2, 2, 1)):
    torch.manual_seed(0)
    net = VanillaNet(arch=dict(dims=[32, 48, 64, 64], strides=list(strides)), act_num=4, out_indices=(0, 1, 2))
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
    return net.eval().switch_to_deploy() or net


@needs_depthwise
@pytest.mark.parametrize('strides', [(2, 2, 1), (4, 1, 1)])  # the published 2x2 pools; a custom arch's 4x4 one
def test_bf16_backbone_runs_its_series_activations_on_the_kernel(monkeypatch, strides):
    net = fused_backbone(strides)
    x = torch.randn(2, 3, 96, 128)
    calls = []
    kernel = cpu_kernels.depthwise_conv
    monkeypatch.setattr(cpu_kernels, 'depthwise_conv', lambda *args: calls.append(args[0].shape) or kernel(*args))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        on_kernel = net(x)
    assert len(calls) == 1 + len(net.stages)  # the stem's activation and every block's
    monkeypatch.setattr(cpu_kernels, 'depthwise_runs', lambda size: False)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        on_onednn = net(x)
    with torch.no_grad():
        fp32 = net(x)
    for a, b, reference in zip(on_kernel, on_onednn, fp32):
        assert a.dtype == torch.bfloat16 and a.is_contiguous()
        # the same bf16 network: apart by bf16 rounding of intermediate maps at most
        assert relative_deviation(b.float(), a.float())['max_rel'] < 2e-2
        assert relative_deviation(reference, a.float())['max_rel'] < 3e-2


def test_bf16_backbone_outputs_leave_through_the_layout_copy(monkeypatch):
    net = fused_backbone()
    copies = []
    copy = cpu_kernels.contiguous
    monkeypatch.setattr(cpu_kernels, 'contiguous', lambda x: copies.append(x.shape) or copy(x))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # a CPU without native bf16 says so once
        outs = net(torch.randn(1, 3, 64, 64))
    if onednn_inference.fast_path_works(torch.bfloat16):
        assert copies == [out.shape for out in outs]
    assert all(out.is_contiguous() for out in outs)


# ---- the quantized depthwise kernel, and the int8 backbone on it ---------------------------------------

def quantize(x, scale, zero_point):
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, 0, 255).to(torch.uint8)


@needs_depthwise
@pytest.mark.parametrize('layout', [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize('n, c, h, w, k', [(1, 40, 13, 37, 9), (2, 512, 3, 240, 9), (1, 24, 6, 5, 5)])
def test_quantized_depthwise_kernel_equals_dequantize_conv_quantize(n, c, h, w, k, layout):
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, c, h, w), generator=generator, dtype=torch.uint8).contiguous(memory_format=layout)
    x_scale, x_zero_point, out_scale, out_zero_point = 0.05, 37, 0.08, 121
    q_weight = torch.randint(-128, 128, (c, 1, k, k), generator=generator).float()
    weight_scales = (torch.rand(c, generator=generator) * 0.002 + 0.0005) * 9 / k  # sums spread as far for any k
    bias = torch.randn(c, generator=generator)
    weight = q_weight * weight_scales.view(-1, 1, 1, 1)
    # PT2E's reference: dequantize, conv in fp32, quantize
    reference = quantize(F.conv2d((x.float() - x_zero_point) * x_scale, weight, bias, padding=k // 2, groups=c),
                         out_scale, out_zero_point)
    kernel_weight = (weight * x_scale).view(c, k, k).permute(1, 2, 0).contiguous()
    out = cpu_kernels.quantized_depthwise_conv(x, x_zero_point, kernel_weight, bias, out_scale, out_zero_point)
    assert out.dtype == torch.uint8 and out.is_contiguous(memory_format=torch.channels_last)
    steps = (out.int() - reference.int()).abs()
    assert steps.max() <= 1 and steps.float().mean() < 1e-3  # one step where fp32 sums round the other way
    assert 0 < (reference == 0).sum() and 0 < (reference == 255).sum()  # both clamps were exercised


@needs_depthwise
def test_int8_backbone_runs_its_series_activations_on_the_kernel(monkeypatch):
    from mmdet_vanillanet.precision import int8 as int8_module
    net = fused_backbone()
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(1, 3, 64, 96, generator=generator) for _ in range(3)]
    net.out_indices = (2,)
    on_kernel = int8_module.quantize_vanillanet(net, calibration_inputs=images)
    # the stem's activation and those of blocks 0 and 1; block 2's output is returned in fp32, so oneDNN keeps it
    assert on_kernel.depthwise_on_kernel == 3
    kernel_calls = [node for node in on_kernel.quantized.graph.nodes
                    if node.target == torch.ops.mmdet_vanillanet.quantized_depthwise_conv_nhwc.default]
    assert len(kernel_calls) == 3
    monkeypatch.setattr(int8_module, 'put_depthwise_on_kernel', lambda graph_module: 0)
    on_onednn = int8_module.quantize_vanillanet(net, calibration=on_kernel.calibration)
    x = torch.randn(1, 3, 96, 64, generator=generator)
    with torch.no_grad():
        fp32, kernel_outs, onednn_outs = net(x), on_kernel(x), on_onednn(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            mixed = on_kernel(x)  # int8-mixed-bf16
    # the same quantized network: apart where a sum rounds to the neighbouring step, and what that carries
    assert relative_deviation(onednn_outs, kernel_outs)['max_rel'] < 5e-2
    assert relative_deviation(fp32, kernel_outs)['max_rel'] < 0.15
    assert all(out.dtype == torch.bfloat16 for out in mixed)
    assert relative_deviation(fp32, [out.float() for out in mixed])['max_rel'] < 0.15
