"""cll as a library: certify your own Lipschitz network with cll's sound bound and audit it.

    import torch
    from torch import nn
    from cll import api
    from cll.layers import MaxMin

    model = api.lipschitz_net(                              # your layers; the last Linear is the head
        nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), MaxMin(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)),
        in_shape=(1, 8, 8),
    )
    ...                                                     # train it as you like
    api.upper_bound(model)                                  # sound Lipschitz bound of the logit differences
    api.certify(model, test_loader, eps=["36/255", 0.25])   # {"clean_accuracy", "cra": {"0.1412": ...}, ...}
    api.audit(model, test_loader, eps=["36/255"], n=500)    # attacks on the certified points
    cfg, model = api.load_run("results/runs/digits/4C3F/cll/eps0.15_p0.3/seed0")   # a `cll train` run

A model is a ``cll.models.LipschitzNet``: a sequential ``body``, a linear ``head`` (the classifier)
and the input shape ``in_shape``; ``lipschitz_net`` wraps your layers into one, ``create_model``
builds a registered architecture (``cll list``), ``load_run`` reads a run directory. The certificate
is the pairwise last-layer rule every method of the paper uses (Losch, Stutz, Schiele, Fritz,
"Certified Robust Models with Slack Control and Large Lipschitz Constants", GCPR 2023, arXiv
2309.06166, after Leino et al., "Globally-Robust Neural Networks", ICML 2021): with j the predicted
class and K_F a sound upper bound on the body's Lipschitz constant, x is certified at eps when
j is its label and min_{i != j} (z_j - z_i) / (K_F ||W_j - W_i||_2) > eps, with the margins
computed less their floating-point rounding bound (``cll.certify``).

Supported body layers (each has a sound bound in ``cll.lipschitz``; any other layer makes every
function here fail with one line naming it, never counting it as 1-Lipschitz): ``nn.Linear``,
``nn.Conv2d`` (no groups, no dilation, zero padding), ``nn.AvgPool2d``, ``nn.ReLU``, ``nn.Flatten``,
``nn.Identity``, and cll's own ``MaxMin``, ``HouseHolder``, ``Normalize``, ``PaddingChannels`` and
the SOC, CPL, SLL and Sandwich layers of ``cll.layers``.

This module only calls ``cll.lipschitz``, ``cll.certify``, ``cll.audit``, ``cll.models`` and
``cll.train``: it is the documented entry point, not a second implementation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import audit as audit_module
from . import certify as certifier
from . import checks, lipschitz
from .config import RunConfig, parse_number
from .errors import CllError, ConfigError
from .models import LipschitzNet, create
from .train import load_run as _load_run
from .values import AUDIT_POINTS, AUDIT_RESTARTS, AUDIT_STEPS, PAPER_EPS

__all__ = [
    "UnsupportedModel",
    "audit",
    "certify",
    "create_model",
    "lipschitz_net",
    "load_run",
    "upper_bound",
]

DEFAULT_EPS = PAPER_EPS  # the poster's radii, 36/255, 72/255, 108/255

create_model = create  # create_model("4C3F", num_classes=10, in_shape=(1, 8, 8)): a registered architecture


class UnsupportedModel(CllError):
    """A model cll cannot certify: not a LipschitzNet, or a body layer without a sound bound."""


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[RunConfig, LipschitzNet]:
    """The resolved config and the trained model of a ``cll train`` run directory (its model.pt)."""
    return _load_run(run_dir, device)


def lipschitz_net(
    layers: nn.Sequential | Sequence[nn.Module], in_shape: Sequence[int], head: nn.Linear | None = None
) -> LipschitzNet:
    """Your layers as a certifiable model: ``layers`` is the body, ``head`` the classifier (None:
    the last of ``layers``, which must then be an ``nn.Linear``). ``in_shape`` is one input's shape
    without the batch axis, e.g. (3, 32, 32). The modules are used as they are (same parameters).
    Fails with one line naming the first layer cll has no sound bound for."""
    layers = list(layers)
    if head is None:
        if not layers or not isinstance(layers[-1], nn.Linear):
            last = type(layers[-1]).__name__ if layers else "nothing"
            raise UnsupportedModel(f"the last layer must be the nn.Linear classifier (or pass head=...); got {last}")
        layers, head = layers[:-1], layers[-1]
    if not isinstance(head, nn.Linear):
        raise UnsupportedModel(f"head must be an nn.Linear (the classifier); got {type(head).__name__}")
    try:
        model = LipschitzNet(nn.Sequential(*layers), head, tuple(in_shape))
    except RuntimeError as err:  # the dry forward pass that traces each layer's input shape
        first = " ".join(str(err).split())[:200]
        raise UnsupportedModel(f"the layers do not run on inputs of shape {tuple(in_shape)} ({first})") from None
    _check_layers(model)
    return model


def _check_interface(model: nn.Module) -> None:
    """A LipschitzNet whose model(x) is the function its bound describes (``cll.checks``: no hooks,
    an exact nn.Linear head, no replaced forwards, float32 weights)."""
    if not isinstance(model, LipschitzNet):
        raise UnsupportedModel(
            f"cll certifies a LipschitzNet (a sequential body, a linear head, in_shape); got "
            f"{type(model).__name__}: wrap your layers with cll.api.lipschitz_net(layers, in_shape)"
        )
    checks.check_model(model)


def _check_layers(model: LipschitzNet) -> None:
    """One line naming the first body layer without a sound bound: a layer type cll has no bound
    for (``lipschitz.check_supported``), or a variant its bound refuses (e.g. a dilated conv)."""
    try:
        lipschitz.check_supported(model.body)
    except TypeError as err:
        raise UnsupportedModel(f"cannot bound {' '.join(str(err).split())}") from None
    shapes = lipschitz.trace_input_shapes(model.body, model.in_shape)
    for i, (layer, shape) in enumerate(zip(model.body, shapes)):
        try:
            lipschitz.upper_bound_layer(layer, shape)
        except (TypeError, ValueError, NotImplementedError, CllError) as err:
            detail = " ".join(str(err).split())
            raise UnsupportedModel(f"cannot bound body[{i}] ({type(layer).__name__}): {detail}") from None


def _supported(model: nn.Module, call):
    """``call()``, with a model cll cannot bound reported in one line naming the layer."""
    _check_interface(model)
    try:
        return call()
    except (TypeError, ValueError, NotImplementedError):
        _check_layers(model)  # raises UnsupportedModel if a layer is the cause
        raise


def _radii(eps: float | str | Iterable[float | str]) -> list[float]:
    values = [eps] if isinstance(eps, (int, float, str)) else list(eps)
    radii = [parse_number("eps", e) for e in values]
    if not radii or any(not r > 0 for r in radii):
        raise ConfigError(f"eps: {values!r} must be one or more radii > 0 (fractions like 36/255 allowed)")
    return radii


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def upper_bound(model: nn.Module) -> float:
    """The sound upper bound the certifier uses on the Lipschitz constant of every logit difference:
    K_F (the product of the body's per-layer bounds) times max_ij ||W_i - W_j||_2 of the head."""
    return _supported(model, lambda: lipschitz.upper_bound(model))


def certify(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps: float | str | Iterable[float | str] = DEFAULT_EPS,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Certify ``model`` on the (x, y) batches of ``loader`` at each radius of ``eps`` (L2, in the
    units of x; fractions such as "36/255" allowed). Returns fractions: ``clean_accuracy``, ``cra``
    {eps key: certified robust accuracy}, ``lipschitz_constant`` (the sound bound), ``n_samples``
    and the rest of ``cll.certify.certify``'s record (for comparison: ``cra_estimate`` with the
    power-iteration estimate of K, which is not a certificate)."""
    radii = _radii(eps)
    seen = 0

    def batches():
        nonlocal seen
        for batch in loader:
            seen += 1
            yield batch

    try:
        return _supported(model, lambda: certifier.certify(model, batches(), radii, _device(model, device)))
    except ValueError:
        if not seen:
            raise ConfigError("certify: the loader yielded no batches") from None
        raise


def audit(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps: float | str | Iterable[float | str] = DEFAULT_EPS,
    n: int = AUDIT_POINTS,
    steps: int = AUDIT_STEPS,
    restarts: int = AUDIT_RESTARTS,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Attack the certified points among the first ``n`` points of ``loader`` at each radius and
    at their own certified radius (PGD-l2 with ``restarts`` restarts, APGD-l2 with the DLR and CE
    losses, ``steps`` iterations each) and measure how tight the certificates are (``cll.audit
    .audit``). Returns ``{"per_eps": {eps key: counts}, "own_radius", "tightness",
    "lipschitz_tightness", "broken": total, ..., "n_samples"}``; ``broken`` > 0 means a certificate
    was refuted (an attack point inside the radius that the model misclassifies, or a Lipschitz
    lower bound above the certified bound)."""
    radii = _radii(eps)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n: {n!r} is not a number of points >= 1")
    where = _device(model, device)
    xs, ys, have = [], [], 0
    for x, y in loader:
        xs.append(x[: n - have])
        ys.append(y[: n - have])
        have += len(xs[-1])
        if have >= n:
            break
    if not have:
        raise ConfigError("audit: the loader yielded no points")
    x, y = torch.cat(xs).to(where), torch.cat(ys).to(where)

    def run() -> dict[str, Any]:
        model.eval()
        return audit_module.audit(model, x, y, radii, steps=steps, restarts=restarts, seed=seed)

    return {**_supported(model, run), "n_samples": have}
