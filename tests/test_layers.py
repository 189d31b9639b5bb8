"""MaxMin's hand-written backward against autograd through its plain expression; every layer of
cll.layers has a case in the layer table that tests/test_peers.py and tests/test_soundness.py run."""

import inspect

import pytest
import torch
from helpers import LAYERS, plain_maxmin
from torch import nn

from cll import layers
from cll.layers import ClippedMaxMin, MaxMin, MaxMinHalves

# what cll.layers exports besides layers: the registry of the activation layers (each of them is a
# class of __all__ too) and the function that builds a head
NOT_LAYERS = {"ACTIVATIONS", "truncation_head", "unit_row_head"}


def test_every_layer_class_has_a_case_in_the_layer_table():
    """A layer added to cll.layers.__all__ gets its bound and its rounding checked (helpers.LAYERS)."""
    exported = {name: getattr(layers, name) for name in layers.__all__ if name not in NOT_LAYERS}
    for name, obj in exported.items():
        assert inspect.isclass(obj) and issubclass(obj, nn.Module), f"{name}: not a layer; add it to NOT_LAYERS"
    assert not any(inspect.isclass(getattr(layers, name)) for name in NOT_LAYERS)  # none of them a layer
    torch.manual_seed(0)
    covered = {type(case.build()) for case in LAYERS.values()}
    assert [name for name, cls in exported.items() if cls not in covered] == []


@pytest.mark.parametrize("shape,channels_last", [((4, 6, 5, 3), False), ((4, 6, 5, 3), True), ((3, 8), False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_maxmin_values_and_gradient_are_autograds_exactly(shape, channels_last, dtype):
    x = torch.randn(*shape, dtype=dtype).round()  # integers: many ties a == b
    x[0] = 0.0  # a zero-padded region: every pair ties
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.randn(*shape, dtype=dtype)
    fast, plain = MaxMin()(x), plain_maxmin(x)
    assert torch.equal(fast, plain) and fast.stride() == x.stride()
    assert torch.equal(torch.autograd.grad(fast, x, grad)[0], torch.autograd.grad(plain, x, grad)[0])
    with torch.no_grad():
        assert torch.equal(MaxMin()(x), plain)


@pytest.mark.parametrize("shape,channels_last", [((4, 6, 5, 3), False), ((4, 6, 5, 3), True), ((3, 8), False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_maxmin_halves_values_and_gradient_are_the_reference_wheres_exactly(shape, channels_last, dtype):
    """LiResNet's MinMax as its code writes it: at a tie b gets the max's gradient, a the min's."""
    x = torch.randn(*shape, dtype=dtype).round()  # integers: many ties a == b
    x[0] = 0.0
    x[1, : shape[1] // 2] = -0.0  # signed zeros tie with +0.0
    column = (-1, *[1] * (len(shape) - 2))  # a value per channel
    x[2] = torch.tensor([1e30, -1e-30, 1e-30, -1e30] * shape[1])[: shape[1]].view(column)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.randn(*shape, dtype=dtype)
    grad[-1] = torch.tensor([1e30, -1e-30] * shape[1])[: shape[1]].view(column)
    a, b = x.chunk(2, dim=1)
    larger = a > b
    plain = torch.cat([torch.where(larger, a, b), torch.where(larger, b, a)], dim=1)
    fast = MaxMinHalves()(x)
    assert torch.equal(fast, plain) and fast.stride() == x.stride()
    assert torch.equal(torch.autograd.grad(fast, x, grad)[0], torch.autograd.grad(plain, x, grad)[0])
    with torch.no_grad():
        assert torch.equal(MaxMinHalves()(x), plain)


def test_maxmin_output_is_a_permutation_of_its_input():
    x = torch.randn(5, 8, 3, 3)
    y = MaxMin()(x.requires_grad_(True))
    assert torch.equal(y.detach().flatten(1).sort(1).values, x.detach().flatten(1).sort(1).values)


def test_clipped_maxmin_keeps_its_gradient_through_the_fast_maxmin():
    layer = ClippedMaxMin((4, 3, 3), init=0.5)
    x = (3 * torch.randn(6, 4, 3, 3)).requires_grad_(True)
    grad = torch.randn(6, 4, 3, 3)
    inputs = [x, layer.theta_max, layer.theta_min]
    maxes, mins = plain_maxmin(x).chunk(2, dim=1)
    plain = torch.cat([torch.minimum(maxes, layer.theta_max), torch.maximum(mins, layer.theta_min)], dim=1)
    fast_grads, plain_grads = torch.autograd.grad(layer(x), inputs, grad), torch.autograd.grad(plain, inputs, grad)
    assert all(torch.equal(f, p) for f, p in zip(fast_grads, plain_grads))
