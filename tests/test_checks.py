"""What the certifier checks before it proves anything (src/cll/checks.py, issue 19): each test builds
an adversarial case itself (a near-tie under a saturated clipped layer, hooks, wrong shapes,
autocast, a module used twice, negative divisors, writes through ``.data``) and asserts a refusal in
one line or a certificate that float64 evaluation cannot refute."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

from cll import api, audit, certify, lipschitz, models
from cll import layers as L
from cll.errors import CllError
from cll.local_lipschitz import LocalBound
from cll.models import LipschitzNet


def _tiny(seed: int = 0) -> LipschitzNet:
    torch.manual_seed(seed)
    return models.create("2C2F", 10, (1, 8, 8), width=0.5).eval()


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


# ------------------------------------------------------------------ 1. local certificates on near-ties
def _near_tie() -> tuple[LipschitzNet, torch.Tensor, torch.Tensor]:
    """Inputs in [0, 1]^2, a dense layer 1000 I + 5000 into a clipped ReLU at 1 (saturated on every
    ball: the local K is 0, the global K_F 1000), a head whose float32 logits tie at 1.0 while the
    exact ones are 1 and 1 + 2^-25: the float32 argmax is class 0, the exact one class 1."""
    body = nn.Sequential(nn.Linear(2, 2), L.ClippedReLU((2,), init=1.0))
    head = nn.Linear(2, 2)
    with torch.no_grad():
        body[0].weight.copy_(1000 * torch.eye(2))
        body[0].bias.fill_(5000.0)
        head.weight.copy_(torch.tensor([[0.0, 0.0], [2.0**-25, 0.0]]))
        head.bias.fill_(1.0)
    model = LipschitzNet(body, head, (2,)).eval()
    x = torch.rand(8, 2)
    return model, x, torch.zeros(8, dtype=torch.long)


def test_a_local_certificate_needs_its_own_float64_class_to_be_the_label():
    model, x, y = _near_tie()
    logits = model(x)
    assert (logits[:, 0] == logits[:, 1]).all() and (logits.argmax(1) == 0).all()  # the float32 tie
    exact = copy.deepcopy(model).double()(x.double())
    assert (exact.argmax(1) == 1).all()  # every label is wrong in exact arithmetic
    assert (LocalBound(model)(x, 0.1) < 1e-60).all()  # the clipped layer is saturated on the balls
    # the float32 pass cannot reach eps = 0.1 for either class (K_F = 1000), so only the local
    # certificate looks at these samples
    out = certify.certify(model, [(x, y)], eps=[0.1], local=True, local_estimate_iters=5)
    assert out["float64_share"] == 0 and out["local_share"] == 1
    assert out["cra"]["0.1"] == 0.0 and out["cra_global"]["0.1"] == 0.0


# ------------------------------------------------------------------ 2. hooks and substituted heads
class DoubleHead(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _with_body_hook(model):
    model.body[1].register_forward_hook(lambda m, i, o: 10 * o)


def _with_head_pre_hook(model):
    model.head.register_forward_pre_hook(lambda m, i: (5 * i[0],))


def _with_subclass_head(model):
    head = DoubleHead(model.head.in_features, model.head.out_features)
    head.load_state_dict(model.head.state_dict())
    model.head = head


def _with_instance_forward(model):
    layer = model.body[0]
    layer.forward = lambda x: 3 * nn.Conv2d.forward(layer, x)


class LoudMaxMin(L.MaxMin):  # overrides forward below the class whose bound (1) it inherits
    def forward(self, x):
        return 3 * super().forward(x)


def _with_subclass_layer(model):
    model.body[1] = LoudMaxMin()


@pytest.mark.parametrize(
    "change, word",
    [
        (_with_body_hook, "hook"),
        (_with_head_pre_hook, "hook"),
        (_with_subclass_head, "nn.Linear"),
        (_with_instance_forward, "replaced"),
        (_with_subclass_layer, "overrides forward"),
    ],
    ids=["body-forward-hook", "head-pre-hook", "linear-subclass-head", "instance-forward", "subclass-layer"],
)
def test_a_model_that_does_not_run_the_bounded_layers_is_refused(change, word):
    model = _tiny()
    x = torch.rand(16, 1, 8, 8)
    change(model)
    for call in (
        lambda: certify.Certifier(model)(x),
        lambda: api.upper_bound(model),
        lambda: api.certify(model, [(x, model(x).argmax(1))], eps=[0.01]),
    ):
        with pytest.raises(CllError) as err:
            call()
        assert word in _one_line(err)


def test_a_global_hook_and_a_hook_added_later_are_refused():
    model = _tiny()
    x = torch.rand(16, 1, 8, 8)
    certifier = certify.Certifier(model)
    handle = torch_module.register_module_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(CllError, match="global module forward hook"):
            certifier(x)
        with pytest.raises(CllError, match="global module forward hook"):
            api.upper_bound(model)
    finally:
        handle.remove()
    certifier(x)  # fine again without it
    handle = model.body[2].register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    with pytest.raises(CllError, match=r"body\.2 \(Conv2d\) has a forward hook"):
        certifier(x)
    with pytest.raises(CllError, match="forward hook"):
        certifier.forward64(x)
    handle.remove()


# ------------------------------------------------------------------ 3. input shapes
def test_inputs_of_another_shape_are_refused_everywhere():
    torch.manual_seed(0)
    moons = models.create("moons-mlp", 2, (2,)).eval()
    x3 = torch.rand(8, 3)
    wide = models.create("2C2F", 10, (1, 16, 16)).eval()
    x17 = torch.rand(8, 1, 17, 17)
    with torch.no_grad():  # both run, silently, on the wrong shapes
        wide(x17)
    for model, x in ((moons, x3), (wide, x17)):
        _refused_everywhere(model, x)


def _refused_everywhere(model: LipschitzNet, x: torch.Tensor) -> None:
    y = torch.zeros(len(x), dtype=torch.long)
    calls = [
        lambda: certify.Certifier(model, eps=[0.01])(x, y),
        lambda: certify.Certifier(model).forward64(x),
        lambda: LocalBound(model)(x, 0.01),
        lambda: audit.audit(model, x, y, [0.01], steps=2, restarts=1),
        lambda: api.certify(model, [(x, y)], eps=[0.01]),
        lambda: api.audit(model, [(x, y)], eps=[0.01], n=4, steps=2, restarts=1),
    ]
    for call in calls:
        with pytest.raises(CllError) as err:
            call()
        assert "in_shape" in _one_line(err)


def test_float64_inputs_and_float64_weights_are_named():
    model = _tiny()
    with pytest.raises(CllError, match=r"input dtype torch\.float64"):
        certify.Certifier(model)(torch.rand(4, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(CllError, match=r"is torch\.float64"):
        certify.Certifier(copy.deepcopy(model).double())


# ------------------------------------------------------------------ 4. autocast and oneDNN's math mode
def test_autocast_around_the_certifier_changes_nothing():
    """bf16 autocast on the CPU would run every conv and product in bf16 (the radii then exceed the
    exact network's); inside the passes it is off, so the radii are bit for bit those without it."""
    model = _tiny()
    x, eps = torch.rand(64, 1, 8, 8), [0.01, 0.02]
    logits, pred, radius = certify.Certifier(model, eps=eps)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # the hazard: autocast is on out here
        logits_ac, pred_ac, radius_ac = certify.Certifier(model, eps=eps)(x)
        z64 = certify.Certifier(model).forward64(x)[0]
    assert logits_ac.dtype == torch.float32 and torch.equal(logits_ac, logits)
    assert torch.equal(pred_ac, pred) and torch.equal(radius_ac, radius)
    assert torch.equal(z64, certify.Certifier(model).forward64(x)[0])


@pytest.mark.parametrize("variable", ["ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE"])
def test_a_lower_onednn_math_mode_is_refused(monkeypatch, variable):
    model = _tiny()
    monkeypatch.setenv(variable, "BF16")
    with pytest.raises(CllError) as err:
        certify.Certifier(model)(torch.rand(4, 1, 8, 8))
    assert variable in _one_line(err)
    monkeypatch.setenv(variable, "strict")
    certify.Certifier(model)(torch.rand(4, 1, 8, 8))


def test_a_torch_mode_is_refused():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Noisy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    model = _tiny()
    certifier = certify.Certifier(model)
    with Noisy(), pytest.raises(CllError, match="torch mode is active"):
        certifier(torch.rand(4, 1, 8, 8))
    with torch.device("cpu"):  # the device context only sets defaults: allowed
        certifier(torch.rand(4, 1, 8, 8))


# ------------------------------------------------------------------ 5. a module used twice
def _shared_twice() -> tuple[LipschitzNet, torch.Tensor]:
    """One dense layer called twice, on inputs of norm ~8000, then ~8: the first call rounds ~1000
    times more than the second, and a bound that kept one input norm per module would miss it."""
    torch.manual_seed(3)
    shared = nn.Linear(64, 64)
    with torch.no_grad():
        shared.weight.mul_(1e-3 / shared.weight.norm(dim=1, keepdim=True))
        shared.bias.zero_()
    body = nn.Sequential(shared, L.MaxMin(), shared, L.MaxMin())
    head = nn.Linear(64, 4)
    with torch.no_grad():
        head.weight.mul_(1e6)
    return LipschitzNet(body, head, (64,)).eval(), 1000 * torch.randn(256, 64)


def test_a_module_used_twice_has_each_call_bounded():
    """The float32 pass's body error is E <- L E + alpha ||h|| + beta over the calls in order, each
    with its own input norm (8000 and 8 here), and covers the float32 - float64 gap."""
    from cll.certify.passes import carry
    from cll.lipschitz.rounding import norm_upper_bound

    model, x = _shared_twice()
    certifier = certify.Certifier(model)
    z32, err32, body32 = certifier.forward32(x)
    expected, h = torch.zeros(len(x), dtype=torch.float64), x
    with torch.no_grad():
        for layer, terms in zip(model.body, certifier.forward32.terms):
            expected = carry(expected, terms, norm_upper_bound(h) if terms.rounding.alpha > 0 else None)
            h = layer(h)
    assert torch.allclose(body32, expected, rtol=1e-12, atol=0)
    z64, err64, body64 = certifier.forward64(x)
    allowed = err32 + err64 + certifier.row_norms * (body32 + body64)[:, None]
    assert ((z32.double() - z64).abs() <= allowed).all()
    assert (z32.double() != z64).any()  # there was rounding to bound


# ------------------------------------------------------------------ 6. signs and degenerate bounds
def _pooled(pool: nn.Module, normalize: nn.Module) -> LipschitzNet:
    torch.manual_seed(4)
    body = nn.Sequential(normalize, nn.Conv2d(1, 4, 3, padding=1), L.MaxMin(), pool, nn.Flatten())
    return LipschitzNet(body, nn.Linear(4 * 4 * 4, 3), (1, 8, 8)).eval()


def test_negative_divisors_and_scales_keep_every_bound_positive():
    plain = _pooled(nn.AvgPool2d(2, divisor_override=4), L.Normalize([0.5], 1.0))
    flipped = _pooled(nn.AvgPool2d(2, divisor_override=-4), L.Normalize([0.5], -1.0))
    flipped.load_state_dict(plain.state_dict())
    k_plain, k_flipped = lipschitz.upper_bound_body(plain), lipschitz.upper_bound_body(flipped)
    assert 0 < k_flipped == k_plain
    x = torch.rand(64, 1, 8, 8)
    _, pred, radius = certify.Certifier(flipped)(x)
    assert torch.isfinite(radius).all() and (radius > 0).any()
    # an attack at each point's own radius (float32 and float64) breaks none of them
    out = audit.audit(flipped, x, pred, [], steps=10, restarts=1)
    assert out["own_radius"]["attacked"] > 0 and out["broken"] == 0


def test_a_layer_bound_that_is_negative_or_not_finite_is_refused():
    class Liar(nn.Identity):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def upper_bound(self, in_shape):
            return self.value

        def rounding(self, in_shape, dtype):
            return lipschitz.Rounding(0.0, 0.0)

    for value in (-1.0, float("nan"), float("inf")):
        model = LipschitzNet(nn.Sequential(nn.Linear(2, 4), Liar(value)), nn.Linear(4, 2), (2,))
        with pytest.raises(CllError) as err:
            certify.Certifier(model)
        assert "body[1] (Liar)" in _one_line(err) and "finite number >= 0" in _one_line(err)
    with pytest.raises(ValueError, match="std 0"):
        L.Normalize([0.0], 0.0)


# ------------------------------------------------------------------ 7. writes that leave no trace
def test_writes_through_data_outdate_every_derived_tensor_and_certifier():
    """An SLL layer's evaluation forward uses 1/t derived from W, cached: a write through ``.data``
    bumps neither W's storage nor its version, but the cache, the bound and a built certifier must
    all see it (with a stale 1/t the forward's Jacobian is ~10x the stale bound)."""
    torch.manual_seed(5)
    layer = L.SLLLinear(16, 12)
    model = LipschitzNet(nn.Sequential(layer), nn.Linear(16, 3), (16,)).eval()
    x = torch.randn(32, 16)
    api.upper_bound(model)
    certifier = certify.Certifier(model)
    certifier(x)
    version = layer.weight._version
    layer.weight.data.mul_(10.0)  # no version bump, same storage
    assert layer.weight._version == version
    bound = api.upper_bound(model)
    assert bound == api.upper_bound(copy.deepcopy(model))  # that of the present weights
    jacobian = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0], x[0])
    head = lipschitz.upper_bound_head(model.head.weight)
    assert torch.linalg.matrix_norm(jacobian, 2).item() * head <= bound
    with pytest.raises(CllError, match="weights changed"):
        certifier(x)
    with pytest.raises(CllError, match="weights changed"):
        certifier.forward64(x)
