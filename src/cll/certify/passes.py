"""The two forward passes of the certifier, each with a bound on its own rounding.

Both carry, per sample, a bound E on ||h_computed - h_exact||_2 through the body, one rule for
every layer (its sound Lipschitz bound L and its own rounding ``layer_rounding``, built once per
precision by ``body_terms``):

    E <- L E + alpha ||h|| + beta        (h: the layer's computed input)

and bound the head's own rounding per logit by gamma_{d+1} (|W_i| |f| + |b_i|) (Higham eq. 3.5),
so the exact margin is at least z_j - z_i - r_j - r_i - ||W_j - W_i|| E. Every term is inflated by
``TERM_SAFETY`` (1 %), which covers the float64 evaluation of the terms themselves (relative error
~gamma_n << 1 %); the final subtraction and division (a few u) are covered by the 1e-9 relative
slack already in every sound bound.

* ``Float32Pass``: the inference pass ``model(x)`` itself. Hooks on the body's layers take the
  input norms the terms need (and check that ``model(x)`` is ``head(body(x))``). Costs almost
  nothing; loose (worst case gamma_n of fan-ins up to thousands).
* ``Float64Pass``: the logits recomputed layer by layer in float64, each layer by its own
  ``forward64`` (the same function on the same derived float32 tensors) or, for a layer without
  derived parameters, a float64 copy of itself. Its bound is ~1e-13 of the logit scale.

The Higham bounds hold for any order of summation, but only for plain inner products: both passes
run under ``full_precision`` (no TF32, no bf16 inside float32 matmuls or convolutions, no cuDNN
(FFT and Winograd algorithms), no NNPACK), whatever the caller set, which is restored afterwards.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import CertificationRefused, WeightsGuard, check_input
from ..errors import CllError
from ..lipschitz.bound import layer_rounding
from ..lipschitz.rounding import TINY, Rounding, full_precision, gamma, norm_upper_bound

TERM_SAFETY = 1.01  # safety factor on every rounding term (see the module docstring)


class LayerTerms(NamedTuple):
    lip: float  # the layer's sound Lipschitz bound
    rounding: Rounding  # its own rounding at the pass's precision


def body_terms(body: nn.Sequential, shapes, bounds, dtype: torch.dtype) -> list[LayerTerms]:
    """The one per-layer term builder of both passes; refuses a rounding bound that is not a pair of
    finite numbers >= 0 (a negative or NaN term would make every margin look larger)."""
    terms = [LayerTerms(b, layer_rounding(layer, s, dtype)) for layer, s, b in zip(body, shapes, bounds)]
    for index, (layer, t) in enumerate(zip(body, terms)):
        if not all(math.isfinite(v) and v >= 0 for v in (t.rounding.alpha, t.rounding.beta)):
            raise CllError(
                f"body[{index}] ({type(layer).__name__}): its {dtype} rounding bound {tuple(t.rounding[:2])} "
                "is not a pair of finite numbers >= 0"
            )
    return terms


def carry(err: torch.Tensor, terms: LayerTerms, norm: torch.Tensor | None) -> torch.Tensor:
    """E <- L E + alpha ||h|| + beta (``norm``: the per-sample bound on ||h||, None where alpha = 0)."""
    own = terms.rounding.beta if norm is None else terms.rounding.alpha * norm + terms.rounding.beta
    return terms.lip * err + TERM_SAFETY * own


class Head(NamedTuple):
    abs_weight: torch.Tensor  # |W| (C, d), float64
    abs_bias: torch.Tensor  # |b| (C,), float64
    tiny: float


def head_terms(head: nn.Linear) -> Head:
    w = head.weight.detach().double()
    bias = head.bias.detach().double().abs() if head.bias is not None else torch.zeros_like(w[:, 0])
    d = w.shape[1]
    return Head(w.abs(), bias, (2 * d + 2) * max(1.0, w.abs().max().item()))


def logit_error(head: Head, features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per logit (N, C): gamma_{d+1} (|W_i| |f| + |b_i|) plus (2d + 2) underflows, inflated."""
    d = head.abs_weight.shape[1]
    size = F.linear(features.flatten(1).abs().double(), head.abs_weight, head.abs_bias)
    return TERM_SAFETY * (gamma(d + 1, dtype) * size + head.tiny * TINY[dtype])


def layer_costs(body: nn.Sequential, shapes) -> list[float]:
    """Floating-point operations of each body layer on one sample (torch's FLOP counter: products
    and convolutions; 1 for a layer without any)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(body.parameters(), None)
    device = param.device if param is not None else "cpu"
    costs = []
    with torch.no_grad():
        for layer, shape in zip(body, shapes):
            counter = FlopCounterMode(display=False)
            with counter:
                layer(torch.zeros(1, *shape, device=device))
            costs.append(max(1.0, float(counter.get_total_flops())))
    return costs


def restart_layer(costs: list[float], share: float = 0.3) -> int | None:
    """The first layer from which the rest of the body costs at most ``share`` of the whole: where a
    float64 pass may start from the float32 activations (None if that is the first layer)."""
    total, suffix = sum(costs), 0.0
    start = len(costs)
    for index in reversed(range(len(costs))):
        suffix += costs[index]
        if suffix > share * total:
            break
        start = index
    return start if 0 < start < len(costs) else None


def _refuse_dtype(where: str, dtype: torch.dtype, wanted: torch.dtype) -> CertificationRefused:
    return CertificationRefused(
        f"{where} computed in {dtype}, not {wanted}: something outside the certifier changed the "
        f"arithmetic (autocast, a dtype cast in a layer); the rounding bounds hold for {wanted} only"
    )


class Float32Pass:
    """The float32 pass ``model(x)`` with a per-sample bound on its rounding.

    ``rigorous`` is False when a body layer's float32 bound is an estimate (the Sandwich conv's
    ``torch.fft``): the pass then only screens samples out, never certifies. With ``restart``, each
    call also keeps the (float32) input of that body layer and the bound on its error so far
    (``restart_input``, ``restart_error``), from which a float64 pass may go on. ``guard`` (the
    certifier's) is checked at every call: no hooks, same weights, the input at ``in_shape``."""

    def __init__(self, model: nn.Module, shapes, bounds, guard: WeightsGuard, restart: int | None = None):
        self.model, self.guard = model, guard
        self.terms = body_terms(model.body, shapes, bounds, torch.float32)
        self.rigorous = all(t.rounding.rigorous for t in self.terms)
        self.head = head_terms(model.head)
        self.restart = restart
        self.restart_input: torch.Tensor | None = None
        self.restart_error: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(float32 logits, logit_error (N, C), body_error (N,)), the bounds in float64."""
        self.guard.check()
        check_input(self.model, x)
        body, head = self.model.body, self.model.head
        calls: list[nn.Module] = []  # the body layers in the order they ran: one entry per call
        norms: dict[int, torch.Tensor] = {}
        seen: dict[str, tuple] = {}
        wanted = {i for i, t in enumerate(self.terms) if t.rounding.alpha > 0}

        def record(module, inputs):  # per call, not per module: a layer may appear twice in the body
            index, h = len(calls), inputs[0]
            calls.append(module)
            if h.dtype != torch.float32:
                raise _refuse_dtype(f"the input of body[{index}]", h.dtype, torch.float32)
            if index in wanted:  # the input norm of a layer that rounds, per sample
                norms[index] = norm_upper_bound(h)
            if index == self.restart:
                seen["restart"] = h

        def remember(name):
            def hook(_module, inputs, output):
                seen[name] = (inputs[0], output)

            return hook

        unique = list({id(layer): layer for layer in body}.values())
        handles = [layer.register_forward_pre_hook(record) for layer in unique]
        handles += [body.register_forward_hook(remember("body")), head.register_forward_hook(remember("head"))]
        try:
            with full_precision():
                logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        if not (
            "body" in seen
            and "head" in seen
            and seen["body"][0] is x
            and seen["head"][0] is seen["body"][1]
            and logits is seen["head"][1]
            and len(calls) == len(body)
            and all(called is layer for called, layer in zip(calls, body))
        ):
            raise CllError(
                f"{type(self.model).__name__}(x) is not head(body(x)): the model does not follow the "
                "certifier's interface (model(x) == model.head(model.body(x)))"
            )
        if logits.dtype != torch.float32:
            raise _refuse_dtype("the logits", logits.dtype, torch.float32)
        err = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for index, terms in enumerate(self.terms):
            if index == self.restart:
                self.restart_input, self.restart_error = seen["restart"], err
            err = carry(err, terms, norms.get(index))
        return logits, logit_error(self.head, seen["head"][0], torch.float32), err


def float64_layer(layer: nn.Module):
    """The layer's evaluation forward in float64 on the same parameters: its own ``forward64`` where
    it derives tensors from its parameters (they must be the float32 ones), else a float64 copy."""
    own = getattr(layer, "forward64", None)
    return own if own is not None else copy.deepcopy(layer).double().eval()


class Float64Pass:
    """The logits of ``model`` recomputed in float64, with a per-sample bound on their rounding.

    ``model`` follows the package's interface: ``model(x) == model.head(model.body(x))`` with a
    sequential ``body`` and a linear ``head`` (``head.weight`` may be a parametrisation: its
    float32 value is the classifier certified). ``guard`` as in ``Float32Pass``."""

    def __init__(self, model: nn.Module, shapes, bounds, guard: WeightsGuard):
        self.model, self.guard, self.shapes = model, guard, shapes
        self.terms = body_terms(model.body, shapes, bounds, torch.float64)
        if not all(t.rounding.rigorous for t in self.terms):
            raise CllError(f"{type(model).__name__}: a body layer has no proved float64 rounding bound")
        self.layers = [float64_layer(layer) for layer in model.body]
        w = model.head.weight.detach().double()
        bias = model.head.bias
        self.head_w = w
        self.head_b = bias.detach().double() if bias is not None else torch.zeros_like(w[:, 0])
        self.head = head_terms(model.head)

    @torch.no_grad()
    def __call__(
        self, x: torch.Tensor, start: int = 0, error: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (N, C), logit_error (N, C), body_error (N,)), all float64. ``start``: begin at that
        body layer, ``x`` being its computed input and ``error`` (N,) a bound on that input's error
        (the float32 pass's ``restart_error``): the float64 pass from there on. ``x``: float32 (an
        input or the float32 pass's activations) or float64."""
        self.guard.check()
        check_input(self.model, x, self.shapes[start], x.dtype if x.dtype == torch.float64 else torch.float32)
        h = x.double()
        err = torch.zeros(len(x), dtype=torch.float64, device=x.device) if error is None else error.double()
        with full_precision():
            for index, (layer, terms) in enumerate(list(zip(self.layers, self.terms))[start:], start):
                norm = norm_upper_bound(h) if terms.rounding.alpha > 0 else None
                err = carry(err, terms, norm)
                h = layer(h)
                if h.dtype != torch.float64:
                    raise _refuse_dtype(f"body[{index}] in the float64 pass", h.dtype, torch.float64)
            h = h.flatten(1) if h.dim() > 2 else h
            logits = F.linear(h, self.head_w, self.head_b)
        return logits, logit_error(self.head, h, torch.float64), err


def head_gap(logits32: torch.Tensor, logits64: torch.Tensor) -> float:
    """Largest |float32 - float64| logit difference over the logit scale (>= 1)."""
    scale = logits64.abs().amax(1, keepdim=True).clamp_min(1.0)
    return ((logits32.double() - logits64).abs() / scale).max().item() if len(logits64) else 0.0


__all__ = ["Float32Pass", "Float64Pass", "full_precision", "head_gap"]
