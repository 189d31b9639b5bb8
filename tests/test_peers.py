"""The peers' layers (SOC, CPL, SLL, Sandwich, HH1, LLN) and model families: Lipschitz constants
measured against the layers' bounds, caches, parameter counts, a training step and a
certification per family, and certificates that a strong attack cannot break."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYERS
from torch import nn

from cll import certify, lipschitz, losses, models
from cll import layers as L
from cll.attack import pgd_l2
from cll.config import build_config
from cll.models import peers

# parameter counts of docs/recipes.md, "Peers" (weights + biases, from the code bases' configurations;
# CIFAR-10 unless noted)
PARAMS_M = {
    ("LipConv-10", 10, (3, 32, 32)): 19.9,
    ("LipConv-20", 10, (3, 32, 32)): 26.2,
    ("SLL-S", 10, (3, 32, 32)): 41.4,
    ("SLL-M", 10, (3, 32, 32)): 78.8,
    ("SLL-L", 10, (3, 32, 32)): 118.3,
    ("SLL-XL", 10, (3, 32, 32)): 236.4,
    ("CPL-XL", 10, (3, 32, 32)): 236.4,  # the SLL paper's table: "about 236M"
    ("Sandwich", 100, (3, 32, 32)): 25.8,
    ("Sandwich", 200, (3, 64, 64)): 39.1,
}


@pytest.mark.parametrize("arch,num_classes,in_shape", list(PARAMS_M), ids=[f"{a}-{c}" for a, c, _ in PARAMS_M])
def test_parameter_counts_match_the_spec(arch, num_classes, in_shape):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = models.create(arch, num_classes, in_shape, head="lln", mean=[0.5] * 3)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(PARAMS_M[(arch, num_classes, in_shape)], abs=0.05)


# ---------------------------------------------------------------- layers: measured constants
def jacobian_norm(layer, x):
    """Exact l2 norm of the layer's Jacobian at x (one sample), from the explicit matrix."""
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0], x)
    return torch.linalg.matrix_norm(jac.reshape(layer(x[None]).numel(), x.numel()).double(), ord=2).item()


# the layers: helpers.LAYERS (shared with tests/test_soundness.py); here the 1-Lipschitz ones
ONE_LIPSCHITZ = sorted(name for name, case in LAYERS.items() if case.one_lipschitz)


@pytest.mark.parametrize("name", ONE_LIPSCHITZ)
def test_layer_is_one_lipschitz_and_within_its_bound(name):
    torch.manual_seed(0)
    build, shape, *_ = LAYERS[name]
    layer = build().double()
    if hasattr(layer, "theta"):
        torch.nn.init.uniform_(layer.theta, 0, 2 * math.pi)  # any angle, not just MaxMin's
    layer.eval()
    bound = lipschitz.upper_bound_layer(layer, shape)
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64)
        exact = jacobian_norm(layer, x)
        assert exact <= bound * (1 + 1e-9), (exact, bound)
        assert exact <= 1 + 1e-4, f"{name}: Jacobian norm {exact} at a random point"
    # the bound is tight, not a loose constant
    assert bound <= 1 + 1e-4
    # and globally: no pair of points is stretched by more than the bound
    a, b = torch.randn(64, *shape, dtype=torch.float64), torch.randn(64, *shape, dtype=torch.float64)
    with torch.no_grad():
        ratio = (layer(a) - layer(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert ratio.max().item() <= bound


def test_soc_bound_accounts_for_the_truncated_series():
    """With few Taylor terms SOC is visibly not orthogonal; the bound must cover the exact norm
    of the polynomial (SOC is affine, so its Jacobian is the operator), and with the evaluation's
    15 terms the bound is 1 up to rounding."""
    torch.manual_seed(1)
    shape = (4, 5, 5)
    layer = L.SOC(4, 4, 3, eval_terms=2).double().eval()
    with torch.no_grad():
        layer.weight.mul_(3.0)
        layer.correction = 2.0  # a large ||A|| makes the truncation error large
    exact = jacobian_norm(layer, torch.zeros(shape, dtype=torch.float64))
    bound = lipschitz.upper_bound_layer(layer, shape)
    assert exact > 1.05, "the test needs a truncation error to see"
    assert exact <= bound
    layer.eval_terms = 15
    exact15 = jacobian_norm(layer, torch.zeros(shape, dtype=torch.float64))
    assert exact15 <= lipschitz.upper_bound_layer(layer, shape) < exact


def test_soc_evaluation_sums_its_convolutions_in_blocks_and_bounds_that():
    """The evaluation forward is the series with its first convolutions summed over input-channel
    blocks in order (what ``rounding`` bounds with gamma_(n/G + G - 1)); the same function as the
    plain convolutions to float32 rounding, and a float32 bound ~4x below the whole fan-in's."""
    from cll.layers.soc import BLOCKED_TERMS, sum_groups

    assert [sum_groups(c, k) for c, k in [(16, 3), (32, 3), (256, 3), (512, 1), (6, 3)]] == [2, 4, 32, 4, 1]
    torch.manual_seed(0)
    layer = L.SOC(32, 32, 3).eval()
    assert layer.groups == 4
    x = torch.randn(3, 32, 5, 5)
    kernel = layer.derived(layer.kernel)
    z = term = x
    for i in range(1, layer.eval_terms + 1):
        if i <= BLOCKED_TERMS:
            parts = [F.conv2d(term[:, 8 * g : 8 * g + 8], kernel[:, 8 * g : 8 * g + 8], padding=1) for g in range(4)]
            term = (((parts[0] + parts[1]) + parts[2]) + parts[3]) / i
        else:
            term = F.conv2d(term, kernel, padding=1) / i
        z = z + term
    with torch.no_grad():
        assert torch.equal(layer(x), z + layer.bias.view(1, -1, 1, 1))
        plain = layer.series(x, kernel, layer.bias, layer.eval_terms)
    assert torch.allclose(layer(x), plain, rtol=0, atol=1e-5)
    blocked = layer.rounding((32, 5, 5), torch.float32).alpha
    layer.groups = 1
    layer.clear_cache()
    whole = layer.rounding((32, 5, 5), torch.float32).alpha
    assert 3.4 < whole / blocked < 3.85  # gamma_288 / gamma_75, less the later terms' plain sums


def test_training_mode_soc_uses_fewer_terms():
    layer = L.SOC(4, 4, 3)
    assert layer.train().terms == 5 and layer.eval().terms == 15


@pytest.mark.parametrize(
    "make", [lambda: L.CPLConv(4, 3, (6, 6)), lambda: L.SandwichLinear(6, 4)], ids=["cpl", "sandwich"]
)
def test_eval_cache_is_dropped_by_train_and_load_state_dict(make):
    torch.manual_seed(0)
    layer, other = make(), make()
    shape = (2, 4, 6, 6) if isinstance(layer, L.CPLConv) else (2, 6)
    x = torch.randn(shape)
    layer.eval()
    first = layer(x)
    assert layer._cache is not None
    assert torch.equal(layer(x), first)  # cached: same output
    layer.load_state_dict(other.state_dict())  # new weights: the cache must go
    assert layer._cache is None
    other.eval()
    assert torch.allclose(layer(x), other(x))
    layer.train()
    assert layer._cache is None


def test_cayley_of_a_256_channel_layer_on_two_threads():
    """The full-size Sandwich's 256-channel layers factor (8 x 5 frequencies, 256 x 256) with
    torch's MKL on 2 threads, which fails these batched LU factorisations unless the solve runs on
    one thread (layers/sandwich.py); the rows come out orthonormal and the backward runs."""
    from cll.layers.sandwich import cayley_rows

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        w = (0.05 * torch.randn(8, 5, 256, 384, dtype=torch.complex64)).requires_grad_()
        q = cayley_rows(w)
        assert torch.get_num_threads() == 2  # restored
        gram = q @ q.mH
        assert (gram - torch.eye(256)).abs().max().item() < 1e-4
        q.real.sum().backward()
        assert torch.isfinite(w.grad).all()
    finally:
        torch.set_num_threads(threads)


def test_sandwich_alpha_exists_before_the_optimizer_and_trains():
    layer = L.SandwichConv(3, 4, 3, (8, 8))
    names = dict(layer.named_parameters())
    assert "alpha" in names
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.alpha.item()
    layer(torch.randn(2, 3, 8, 8)).square().sum().backward()
    assert layer.alpha.grad is not None and layer.alpha.grad.abs().item() > 0
    opt.step()
    assert layer.alpha.item() != before


def test_householder_at_init_is_minmax_over_halves_as_in_socs_code():
    x = torch.randn(5, 6, 2, 2)
    a, b = x.chunk(2, dim=1)
    assert torch.allclose(L.HouseHolder(6)(x), torch.cat([torch.minimum(a, b), torch.maximum(a, b)], 1), atol=1e-6)


def test_unit_row_head_is_normalised_everywhere():
    head = L.unit_row_head(5, 3)
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(3))
    x = torch.randn(4, 5)
    assert torch.allclose(head(x), x @ head.weight.t() + head.bias)


def test_sll_safe_inverse_has_no_inf():
    layer = L.SLLLinear(4, 3)
    with torch.no_grad():
        layer.weight[1].zero_()  # a dead unit: t = 0
    t_inv = layer.inverse_t()
    assert torch.isfinite(t_inv).all() and t_inv[1] == 0
    assert torch.isfinite(layer(torch.randn(2, 4))).all()


def test_soc_normalisation_factor_enters_the_body_bound():
    model = peers.lipconv(1, 10, (3, 32, 32), init_channels=4, mean=[0.5] * 3)
    assert model.input_lipschitz == pytest.approx(1 / 0.2507)
    assert lipschitz.upper_bound_body(model) >= 1 / 0.2507


# ---------------------------------------------------------------- families: train, certify, attack
def tiny(family, num_classes, shape, head):
    if family == "lipconv":
        return peers.lipconv(1, num_classes, shape, head=head, init_channels=4, mean=[0.4] * 3)
    if family == "cpl":
        return peers.residual_net(
            lambda c, i, hw: L.CPLConv(c, i, hw),
            L.CPLLinear,
            2,
            2,
            8,
            num_classes,
            shape,
            head=head,
            mean=[0.4] * 3,
            inner_conv=4,
            inner_dense=32,
        )
    if family == "sll":
        return peers.residual_net(
            lambda c, i, hw: L.SLLConv(c, i),
            L.SLLLinear,
            2,
            2,
            8,
            num_classes,
            shape,
            head=head,
            mean=[0.4] * 3,
            inner_conv=4,
            inner_dense=32,
        )
    return peers.sandwich_net(num_classes, shape, head=head, mean=[0.4] * 3, width=1 / 16)


FAMILIES = ["lipconv", "cpl", "sll", "sandwich"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "num_classes,shape", [(10, (3, 32, 32)), (100, (3, 32, 32)), (200, (3, 64, 64))], ids=["c10", "c100", "tiny"]
)
def test_family_trains_a_step_and_certifies(family, num_classes, shape):
    torch.manual_seed(0)
    model = tiny(family, num_classes, shape, head="lln")
    x, y = torch.rand(4, *shape), torch.randint(0, num_classes, (4,))
    k = lipschitz.estimate_body(model, 5)
    loss = losses.OffsetCrossEntropy(2.12, 0.25)(model(x), y) + losses.lipschitz_penalty(
        k, model.head.weight, 1e-3, 2.0, y, "batch"
    )
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    out = certify.certify(model, [(x, y)], [36 / 255])
    # power iteration does not follow the peers' layers: no estimate rather than a wrong one
    assert out["lipschitz_estimate"] is None and out["cra_estimate"] is None
    assert out["lipschitz_body"] >= 1 and out["rounding"] == "rigorous"
    assert 0 <= out["cra"]["0.1412"] <= out["clean_accuracy"] <= 1


def blobs(n, shape, classes=3, seed=0):
    """A small separable image task: each class is a fixed random pattern (the same for every
    ``seed``) plus noise drawn from ``seed``."""
    centres = 0.5 + 0.25 * torch.randn(classes, *shape, generator=torch.Generator().manual_seed(123)).clamp(-2, 2)
    y = torch.arange(n) % classes
    noise = 0.05 * torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    return (centres[y] + noise).clamp(0, 1), y


def trained_tiny(family: str, steps: int, shape=(3, 32, 32)) -> nn.Module:
    """``tiny(family)`` with an LLN head trained ``steps`` steps of SLL's offset CE on blobs (seed 0)."""
    torch.manual_seed(0)
    model = tiny(family, 3, shape, head="lln")
    x, y = blobs(48, shape)
    criterion = losses.OffsetCrossEntropy(2.12, 0.25)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _step in range(steps):
        idx = torch.randint(0, len(x), (16,))
        loss = criterion(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_no_certified_point_of_a_trained_family_is_broken(family):
    shape = (3, 32, 32)
    model = trained_tiny(family, 20, shape)
    xt, yt = blobs(24, shape, seed=1)
    certifier = certify.Certifier(model)
    _, pred, radius = certifier(xt)
    checked = 0
    for eps in (0.05, 0.25, 1.0):
        mask = (pred == yt) & (radius > eps)
        if not mask.any():
            continue
        adv = pgd_l2(model, xt[mask], yt[mask], eps * (1 - 1e-5), steps=20, restarts=2)
        assert ((adv - xt[mask]).flatten(1).norm(dim=1) <= eps).all()
        with torch.no_grad():
            broken = (model(adv).argmax(1) != yt[mask]).sum().item()
        assert broken == 0, f"{family}: {broken} certified points broken at eps {eps}"
        checked += mask.sum().item()
    assert checked > 0, f"{family}: nothing certified, the attack would prove nothing"


# ---------------------------------------------------------------- the peers' losses
def test_offset_cross_entropy_closed_form():
    z = torch.tensor([[2.0, 0.5, -1.0]])
    y = torch.tensor([0])
    loss = losses.OffsetCrossEntropy(1.5, 0.25)(z, y)
    shifted = (z - torch.tensor([[1.5, 0.0, 0.0]])) / 0.25
    assert loss.item() == pytest.approx(0.25 * F.cross_entropy(shifted, y).item())


def test_hinge_is_cpls_multi_margin():
    z = torch.tensor([[1.0, 0.6, -1.0], [0.0, 2.0, 0.1]])
    y = torch.tensor([0, 0])
    # row 0: max(0, .7 - 1 + .6) + max(0, .7 - 1 - 1) = 0.3; row 1: 2.7 + 0.8 = 3.5; mean / C
    assert losses.MultiMarginHinge(0.7)(z, y).item() == pytest.approx((0.3 + 3.5) / 3 / 2)


def test_certificate_regulariser_rewards_radius():
    w = torch.eye(3)
    z = torch.tensor([[3.0, 1.0, 0.0]], requires_grad=True)
    y = torch.tensor([0])
    plain = losses.CertificateRegularisedCE(0.0)(z, y, w, 1.0)
    reg = losses.CertificateRegularisedCE(0.5)(z, y, w, 1.0)
    radius = losses.label_radius(z, y, w, 1.0)
    assert radius.item() == pytest.approx(2 / math.sqrt(2))
    assert reg.item() == pytest.approx(plain.item() - 0.5 * radius.item())


def test_batch_penalty_is_the_max_over_the_batch_pairs():
    w = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 0.1]], requires_grad=True)
    y = torch.tensor([2, 2])  # rows of label 2 only: max(||w2 - w0||, ||w2 - w1||, 1) = sqrt(9.01)
    pen = losses.lipschitz_penalty(torch.tensor(2.0), w, 1e-3, 2.0, y, "batch")
    assert pen.item() == pytest.approx(1e-3 * (2 * math.sqrt(9.01)) ** 2)
    glob = losses.lipschitz_penalty(torch.tensor(2.0), w, 1e-3, 2.0)
    assert glob.item() == pytest.approx(1e-3 * (2 * math.sqrt(9.01)) ** 2)
    pen_small = losses.lipschitz_penalty(torch.tensor(2.0), w * 0.01, 1e-3, 2.0, y, "batch")
    assert pen_small.item() == pytest.approx(1e-3 * 2.0**2)  # K_tt := 1 is the floor


def test_each_loss_gets_the_head_its_code_base_trains():
    moons = {"dataset": "moons", "arch": "moons-mlp"}
    loss = {n: losses.create(build_config({**moons, "loss": n})) for n in losses.names()}
    assert {n: f.head for n, f in loss.items() if f.head != "linear"} == {
        "soc_cr": "lln",
        "cpl_hinge": "trunc",
        "sll_offset_ce": "trunc",
        "emma": "lln",  # LiResNet's use_lln
        "logit_annealing": "lln",  # BRONet's use_lln
    }
    assert [n for n, f in loss.items() if f.local_certificate] == ["local_lip_b"]  # cll certify --local


def test_truncation_head_is_the_first_features_and_certifies():
    """CPL's and SLL's default last layer: logits = the first C features, never trained, every row
    distance sqrt 2 in the certificate."""
    model = models.create("CPL-S", 10, (3, 32, 32), head="trunc", width=0.1)
    h = model.body(torch.rand(4, 3, 32, 32))
    assert torch.equal(model.head(h), h[:, :10]) and not model.head.weight.requires_grad
    out = certify.certify(model, [(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))], eps=[0.01])
    assert out["lipschitz_constant"] == pytest.approx(out["lipschitz_body"] * math.sqrt(2), rel=1e-6)
    with pytest.raises(ValueError, match="truncation head needs >= 10 features"):
        L.truncation_head(8, 10)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_schur_bound_covers_the_conv_norm(stride, padding):
    torch.manual_seed(2)
    w = torch.randn(5, 3, 3, 3)
    exact = lipschitz.spectral_norm_exact(lipschitz.conv_matrix(w, (3, 7, 7), (stride,) * 2, (padding,) * 2))
    assert exact <= lipschitz.schur_bound(w)


# ---------------------------------------------------------------- through the CLI, on real images
CLI_RUNS = {
    "LipConv-10": dict(loss="soc_cr", cr_gamma=0.1, width=0.125, optimizer="sgd", lr=0.1),
    "CPL-S": dict(loss="cpl_hinge", width=0.1),
    "SLL-S": dict(loss="cll", eps=1.0, p=3e-3, width=0.1, lip_penalty=1e-5, lip_penalty_form="batch"),
    "Sandwich": dict(loss="sll_offset_ce", width=1 / 16, lr=0.01, head="lln"),
    # LiResNet's recipe keys (docs/recipes.md): NAdam with Lookahead (its state in the checkpoint), warm-up, clipping
    "LiResNet-L2W32": dict(loss="emma", optimizer="nadam", lookahead=True, warmup_epochs=0.5, grad_clip=3.0),
    # BRONet's (docs/recipes.md): Logit Annealing, NAdam with Lookahead and weight decay, warm-up, clipping
    "BRONet-L2W32": dict(
        loss="logit_annealing",
        offset=2.0,
        temperature=0.75,
        optimizer="nadam",
        lookahead=True,
        weight_decay=4e-5,
        warmup_epochs=0.5,
        grad_clip=3.0,
    ),
}


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("arch", list(CLI_RUNS))
def test_cli_trains_certifies_and_reloads_each_family(arch, unpack, tmp_path):
    """`cll train` + `cll certify` on real CIFAR-10 images at a small width: the checkpoint holds
    every state the family needs (SOC's singular vectors, CPL's iterates, LLN's free weights), so
    the reloaded model certifies exactly as the trained one."""
    from cll.cli import main
    from cll.results import read_json
    from cll.train import load_run

    root = unpack("cifar10-subset.tgz")
    sets = {
        **dict(
            dataset="cifar10",
            arch=arch,
            data_root=str(root),
            max_train=64,
            max_test=32,
            epochs=1,
            batch_size=32,
            lip_penalty=0.0,
        ),
        **CLI_RUNS[arch],
    }
    args = [f"{k}={v}" for k, v in sets.items()]
    with pytest.warns(UserWarning, match="only data_batch_1"):
        main(["train", "--out", str(tmp_path), "--set", *args])
        main(["certify", "--run", str(tmp_path), "--eps", "36/255"])
    out = read_json(tmp_path / "certify.json")
    assert out["n_samples"] == 32 and out["lipschitz_constant"] > 0
    cfg, model = load_run(tmp_path)
    head = losses.create(cfg).head if cfg.head == "auto" else cfg.head
    assert torch.nn.utils.parametrize.is_parametrized(model.head) == (head == "lln")
    assert (head == "trunc") == torch.equal(model.head.weight, torch.eye(*model.head.weight.shape))
    with pytest.warns(UserWarning):
        from cll import data

        _, test_set, _ = data.load_dataset("cifar10", root=root, augment=False, max_test=32)
    x, y = next(iter(torch.utils.data.DataLoader(test_set, batch_size=32)))
    again = certify.certify(model, [(x, y)], [36 / 255])
    assert again["cra"] == out["cra"] and again["clean_accuracy"] == out["clean_accuracy"]
    assert again["lipschitz_constant"] == pytest.approx(out["lipschitz_constant"], rel=1e-12)


# ---------------------------------------------------------------- the forks' training-time choices
def test_soc_power_iteration_follows_socs_schedule():
    """50 iterations at the first training step and every 200th, one at the others (SOC's code)."""
    torch.manual_seed(0)
    layer, x = L.SOC(4, 4, 3).train(), torch.rand(2, 4, 6, 6)
    ref = copy.deepcopy(layer)
    for steps, n_iter in ((0, 50), (1, 1), (200, 50), (201, 1)):
        layer.steps.fill_(steps)
        layer(x)
        ref._power_step(n_iter)
        assert all(torch.equal(getattr(layer, f"u{n}"), getattr(ref, f"u{n}")) for n in range(4)), steps
    assert layer.steps.item() == 202
    resumed = L.SOC(4, 4, 3).train()  # a checkpoint's count, loaded in place, is the one it goes on from
    resumed.load_state_dict({**layer.state_dict(), "steps": torch.tensor(399)})
    for steps, n_iter in ((399, 1), (400, 50)):
        ref = copy.deepcopy(resumed)
        resumed(x)
        ref._power_step(n_iter)
        assert all(torch.equal(getattr(resumed, f"u{n}"), getattr(ref, f"u{n}")) for n in range(4)), steps


def test_cpl_training_sigma_is_cpls_estimate_and_gradient():
    """sigma = <W u_1, v_0>, v_0 = W u_0 / ||W u_0||, u_1 = W^T v_0 / ||W^T v_0|| (no gradient through
    u_1): CPL's SpectralNormPowerMethod, value and weight gradient."""
    torch.manual_seed(1)
    layer = L.CPLLinear(6, 9).train()
    w, u0 = layer.weight.detach().clone().requires_grad_(True), layer.u.clone()
    v0 = F.linear(u0, w)
    v0 = v0 / (v0.norm() + 1e-12)
    u1 = F.linear(v0, w.t()).detach()
    u1 = u1 / (u1.norm() + 1e-12)
    expected = (F.linear(u1, w) * v0).sum()
    expected.backward()
    sigma = layer._train_sigma()
    sigma.backward()
    assert sigma.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(layer.weight.grad, w.grad)
    assert torch.allclose(layer.u, u1)


def test_sll_weights_are_abs_q_as_in_slls_code():
    torch.manual_seed(2)
    dense, conv = L.SLLLinear(6, 9).eval(), L.SLLConv(4, 3).eval()
    assert (dense.q >= 0).all() and (dense.q < 1).all()  # U(0, 1), the conv's N(0, 1)
    for layer, x in ((dense, torch.randn(3, 6)), (conv, torch.randn(3, 4, 5, 5))):
        before = layer(x)
        with torch.no_grad():
            layer.q.neg_()  # |q| is the weight: the sign does not matter
        assert torch.equal(layer(x), before)


def test_input_shifts_follow_the_forks():
    """SOC's code subtracts CIFAR-10's mean from every data set, SLL's ImageNet's from Tiny-ImageNet."""
    cifar100 = (0.5071, 0.4865, 0.4409)
    lipconv = models.create("LipConv-5", 100, (3, 32, 32), mean=cifar100, width=0.25)
    assert torch.allclose(lipconv.body[0].mean.flatten(), torch.tensor(peers.SOC_MEAN))
    tiny = models.create("SLL-S", 200, (3, 64, 64), mean=(0.48, 0.45, 0.40), width=0.05)
    assert torch.allclose(tiny.body[0].mean.flatten(), torch.tensor(peers.IMAGENET_MEAN))
    sll = models.create("SLL-S", 100, (3, 32, 32), mean=cifar100, width=0.05)
    assert torch.allclose(sll.body[0].mean.flatten(), torch.tensor(cifar100))
