"""The int8 backbone's series activations on the project's depthwise kernel: a rewrite of the converted PT2E graph.

PT2E leaves each quantized depthwise conv as ``dequantize_per_tensor -> conv2d(dequantize_per_channel(w)) ->
quantize_per_tensor``, which inductor lowers to oneDNN's int8 conv: 150 ms of the 260 ms int8 VanillaNet-13 at
640 x 960 on an AMX Xeon. :func:`put_depthwise_on_kernel` replaces the three nodes by one call of
``quantized_depthwise_conv_nhwc``, which reads the uint8 map, computes the same conv in fp32 on the dequantized
values and writes the uint8 map the next node reads, quantized with the same scale and zero point. Only the
rounding of the result can differ (the fp32 sum's order), by one quantization step at most.
"""
import torch

from ..models import cpu_kernels

_ops = torch.ops.quantized_decomposed


def _only(node, target):
    return node if isinstance(node, torch.fx.Node) and node.target == target else None


def _get_attr(graph_module, node):
    """The constant a ``get_attr`` node reads, or None for any other argument."""
    if not isinstance(node, torch.fx.Node) or node.op != 'get_attr':
        return None
    value = graph_module
    for name in node.target.split('.'):
        value = getattr(value, name)
    return value


def _conv_arguments(conv):
    """(input, weight, bias, stride, padding, dilation, groups) of an ``aten.conv2d`` node, defaults filled in."""
    input, weight, bias, stride, padding, dilation, groups = list(conv.args) + [None] * (7 - len(conv.args))
    return input, weight, bias, stride or [1, 1], padding or [0, 0], dilation or [1, 1], groups or 1


def _depthwise_match(conv):
    """The parts of a quantized series activation around ``conv``, or None where it is something else.

    An activation whose output the backbone returns is left to oneDNN: its fp32 output is used as well.
    """
    if len(conv.users) != 1:
        return None
    input, weight, bias, stride, padding, dilation, groups = _conv_arguments(conv)
    dequantized_input = _only(input, _ops.dequantize_per_tensor.default)
    dequantized_weight = _only(weight, _ops.dequantize_per_channel.default)
    quantize = _only(next(iter(conv.users)), _ops.quantize_per_tensor.default)
    if dequantized_input is None or dequantized_weight is None or quantize is None:
        return None
    q_weight = _get_attr(conv.graph.owning_module, dequantized_weight.args[0])
    if q_weight is None:
        return None
    weight_shape = tuple(q_weight.shape)
    size = weight_shape[-1]
    if (len(weight_shape) != 4 or weight_shape[1] != 1 or weight_shape[0] != groups or weight_shape[2] != size
            or list(stride) != [1, 1] or list(dilation) != [1, 1] or list(padding) != [size // 2] * 2
            or not cpu_kernels.depthwise_runs(size)):
        return None
    return dequantized_input, dequantized_weight, bias, quantize


def _kernel_weights(graph_module, dequantized_input, dequantized_weight, bias):
    """The kernel's fp32 (K, K, C) weights (dequantized, times the input's scale) and (C,) bias."""
    _, input_scale, input_zero_point, quant_min, quant_max, dtype = dequantized_input.args[:6]
    if dtype != torch.uint8 or (quant_min, quant_max) != (0, 255) or not isinstance(input_scale, float):
        return None
    q_weight, scales, zero_points = (_get_attr(graph_module, node) for node in dequantized_weight.args[:3])
    axis = dequantized_weight.args[3]
    if scales is None or zero_points is None or axis != 0 or torch.any(zero_points != 0):
        return None
    weight = q_weight.float() * scales.float().view(-1, 1, 1, 1) * input_scale
    channels, _, size, _ = weight.shape
    bias_value = torch.zeros(channels) if bias is None else _get_attr(graph_module, bias)
    if bias_value is None:
        return None
    bias_value = bias_value.detach().float()
    return weight.view(channels, size, size).permute(1, 2, 0).contiguous(), bias_value.contiguous()


def put_depthwise_on_kernel(graph_module):
    """Rewrite, in place, every quantized depthwise conv of a converted PT2E graph whose kernel size the project's
    kernel runs on this machine into one call of it.

    Args:
        graph_module (torch.fx.GraphModule): what ``convert_pt2e`` returned.

    Returns:
        int: the number of convs rewritten (0 where the kernel does not run here).
    """
    graph = graph_module.graph
    rewritten = 0
    for conv in [node for node in graph.nodes if node.target == torch.ops.aten.conv2d.default]:
        match = _depthwise_match(conv)
        if match is None:
            continue
        dequantized_input, dequantized_weight, bias, quantize = match
        weights = _kernel_weights(graph_module, dequantized_input, dequantized_weight, bias)
        _, out_scale, out_zero_point, out_min, out_max, out_dtype = quantize.args[:6]
        if weights is None or out_dtype != torch.uint8 or (out_min, out_max) != (0, 255):
            continue
        names = []
        for suffix, tensor in zip(('weight', 'bias'), weights):
            names.append(f'_vanillanet_depthwise_{rewritten}_{suffix}')
            graph_module.register_buffer(names[-1], tensor)
        with graph.inserting_before(quantize):
            weight_node, bias_node = (graph.get_attr(name) for name in names)
            kernel = graph.call_function(torch.ops.mmdet_vanillanet.quantized_depthwise_conv_nhwc.default,
                                         (dequantized_input.args[0], int(dequantized_input.args[2]), weight_node,
                                          bias_node, float(out_scale), int(out_zero_point)))
        quantize.replace_all_uses_with(kernel)
        graph.erase_node(quantize)
        graph.erase_node(conv)
        rewritten += 1
    if rewritten:
        graph.eliminate_dead_code()
        graph.lint()
        graph_module.recompile()
    return rewritten
