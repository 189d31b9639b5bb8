"""The sound bound: a guaranteed upper bound on the Lipschitz constant of a model, layer by layer.

Each of cll's own layers bounds itself, next to its forward (``cll.layers``):

    upper_bound(in_shape) -> float        >= its l2 Lipschitz constant as evaluated (eval mode),
                                            in exact arithmetic on its float32 parameters
    rounding(in_shape, dtype) -> Rounding  its own float32/float64 error (``cll.lipschitz.rounding``)
    exact_bound (class attribute, optional) True when upper_bound is the constant itself

torch's own layer types get the small table ``TORCH_LAYERS`` here (exact types only: a subclass may
change the forward, so it must bound itself). Any other layer type raises: a layer is never assumed
1-Lipschitz by default. The model's constant is the product of its body's bounds times the head's
largest pairwise row distance max_ij ||W_i - W_j||_2 (the Lipschitz constant of every logit
difference z_i - z_j).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ..errors import CllError
from .conv import conv_norm_bound
from .operators import (
    ROUNDING_SLACK,
    check_conv,
    conv_output_hw,
    max_row_distance,
    spectral_norm_exact,
    trace_input_shapes,
)
from .rounding import EXACT, Rounding, affine_rounding, gamma, underflow


class TorchLayer(NamedTuple):
    bound: Callable[..., float]  # (layer, in_shape, method) -> float
    rounding: Callable[[nn.Module, tuple, torch.dtype], Rounding]
    exact: bool = False  # the bound is the constant itself


def _conv_bound(layer: nn.Conv2d, in_shape: tuple[int, ...], method: str = "auto") -> float:
    check_conv(layer)
    return conv_norm_bound(layer.weight, in_shape, layer.stride, layer.padding, method)


def _conv_rounding(layer: nn.Conv2d, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
    check_conv(layer)
    return affine_rounding(layer.weight, layer.bias, math.prod(conv_output_hw(layer, in_shape)), dtype)


def _pool_geometry(layer: nn.AvgPool2d) -> tuple[int, int]:
    """(k*k, |divisor|) of a non-overlapping, unpadded average (or sum/divisor) pooling: a negative
    divisor flips the sign, which changes no norm."""
    k = (layer.kernel_size,) * 2 if isinstance(layer.kernel_size, int) else tuple(layer.kernel_size)
    s = (layer.stride,) * 2 if isinstance(layer.stride, int) else tuple(layer.stride)
    if s != k or layer.padding not in (0, (0, 0)) or layer.ceil_mode:
        raise TypeError(f"no Lipschitz bound for overlapping, padded or ceil-mode pooling {layer}")
    return k[0] * k[1], abs(layer.divisor_override or k[0] * k[1])


def _pool_bound(layer: nn.AvgPool2d, in_shape: tuple[int, ...], method: str = "auto") -> float:
    """Each output is the sum of k*k disjoint inputs over the divisor: the norm is sqrt(k*k) / divisor
    (CPL/SLL's 4x4 sum over 4: 1)."""
    area, divisor = _pool_geometry(layer)
    return math.sqrt(area) / divisor * (1 + ROUNDING_SLACK)


def _pool_rounding(layer: nn.AvgPool2d, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
    """A sum of k*k terms and one division (or product with 1/divisor): per output <= gamma_{k*k+1}
    times the sum of the |inputs| over the divisor, whose l2 norm over all outputs is
    <= sqrt(k*k)/divisor ||h|| (Cauchy-Schwarz on disjoint blocks)."""
    area, divisor = _pool_geometry(layer)
    outputs = math.prod(in_shape) // area
    return Rounding(gamma(area + 1, dtype) * math.sqrt(area) / divisor, underflow(area + 1, outputs, dtype))


def _linear_bound(layer: nn.Linear, in_shape: tuple[int, ...], method: str = "auto") -> float:
    return spectral_norm_exact(layer.weight)


def _linear_rounding(layer: nn.Linear, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
    return affine_rounding(layer.weight, layer.bias, 1, dtype)


def _one(layer: nn.Module, in_shape: tuple[int, ...], method: str = "auto") -> float:
    return 1.0


def _exact(layer: nn.Module, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
    return EXACT


TORCH_LAYERS: dict[type, TorchLayer] = {
    nn.Linear: TorchLayer(_linear_bound, _linear_rounding),
    nn.Conv2d: TorchLayer(_conv_bound, _conv_rounding),
    nn.AvgPool2d: TorchLayer(_pool_bound, _pool_rounding, exact=True),
    nn.ReLU: TorchLayer(_one, _exact, exact=True),  # max(x, 0): 1-Lipschitz, exact in floating point
    nn.Flatten: TorchLayer(_one, _exact, exact=True),
    nn.Identity: TorchLayer(_one, _exact, exact=True),
}


def _unknown(layer: nn.Module) -> TypeError:
    return TypeError(
        f"no Lipschitz bound for layer type {type(layer).__name__}: give it upper_bound(in_shape) and "
        "rounding(in_shape, dtype) next to its forward (a layer is never assumed 1-Lipschitz by default)"
    )


def _torch_layer(layer: nn.Module) -> TorchLayer:
    spec = TORCH_LAYERS.get(type(layer))
    if spec is None:
        raise _unknown(layer)
    return spec


def upper_bound_layer(layer: nn.Module, in_shape: tuple[int, ...], method: str = "auto") -> float:
    """Guaranteed upper bound on the l2 Lipschitz constant of one layer at input shape ``in_shape``
    (bias ignored: it cancels in differences). ``method`` (torch's conv layers only): "auto" (exact
    where the explicit matrix is small, else FFT), "explicit" or "fft"."""
    own = getattr(layer, "upper_bound", None)
    if own is not None:
        return own(in_shape)
    return _torch_layer(layer).bound(layer, in_shape, method)


def layer_rounding(layer: nn.Module, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
    """The layer's own rounding at ``dtype`` (see ``cll.lipschitz.rounding``)."""
    own = getattr(layer, "rounding", None)
    if own is not None:
        return own(in_shape, dtype)
    return _torch_layer(layer).rounding(layer, in_shape, dtype)


def exact_constant(layer: nn.Module, in_shape: tuple[int, ...]) -> float | None:
    """The layer's Lipschitz constant where its bound is the constant itself (MaxMin, HH1, padding,
    normalisation, pooling, ...), else None."""
    if getattr(layer, "exact_bound", False) or (type(layer) in TORCH_LAYERS and TORCH_LAYERS[type(layer)].exact):
        return upper_bound_layer(layer, in_shape)
    return None


def check_supported(body: nn.Sequential) -> None:
    """Raise, naming the first body layer without a bound: ``body[3] (Softplus): ...``."""
    for index, layer in enumerate(body):
        if getattr(layer, "upper_bound", None) is None and type(layer) not in TORCH_LAYERS:
            raise TypeError(f"body[{index}] ({type(layer).__name__}): {_unknown(layer)}")


def upper_bound_layers(model: nn.Module) -> tuple[list[tuple[int, ...]], list[float]]:
    """(input shape, sound bound) of every body layer, in order. A bound that is not a finite number
    >= 0 raises, naming the layer: a negative one would make K_F negative and every radius infinite."""
    check_supported(model.body)
    shapes = trace_input_shapes(model.body, model.in_shape)
    bounds = [upper_bound_layer(layer, shape) for layer, shape in zip(model.body, shapes)]
    for index, (layer, value) in enumerate(zip(model.body, bounds)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise CllError(
                f"body[{index}] ({type(layer).__name__}): its Lipschitz bound {value!r} is not a finite number >= 0"
            )
    return shapes, bounds


def upper_bound_body(model: nn.Module) -> float:
    """Sound K_F: the product of every body layer's upper bound (the input normalisation included)."""
    return math.prod(upper_bound_layers(model)[1])


def upper_bound_head(weight: torch.Tensor) -> float:
    """Sound max_ij ||W_i - W_j||_2 of a linear head (float64, inflated for its rounding)."""
    with torch.no_grad():
        value = max_row_distance(weight.detach().double()).item() * (1 + ROUNDING_SLACK)
    if not math.isfinite(value):
        raise CllError(f"the head's largest row distance is {value}: its weights are not finite")
    return value


def upper_bound(model: nn.Module, body: float | None = None) -> float:
    """The sound Lipschitz bound of every logit difference of ``model``: K_F * max_ij ||W_i - W_j||_2
    (``body``: a K_F from ``upper_bound_body`` already at hand)."""
    body = upper_bound_body(model) if body is None else body
    return body * upper_bound_head(model.head.weight)
