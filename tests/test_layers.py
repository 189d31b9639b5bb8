"""MaxMin's hand-written backward against autograd through its plain expression."""

import pytest
import torch
from helpers import plain_maxmin

from cll.layers import ClippedMaxMin, MaxMin


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
