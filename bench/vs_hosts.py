#!/usr/bin/env python
"""The two hosts against their reference code: LiResNet (github.com/hukkai/liresnet) and BRONet
(github.com/ntuaislab/BRONet, its ``bronet/`` folder), issue 20 item 5.

    git --git-dir=GIT_LIRESNET archive HEAD | tar -x -C /tmp/ref-liresnet
    git --git-dir=GIT_BRONET archive HEAD | tar -x -C /tmp/ref-bronet
    python bench/vs_hosts.py --ref-liresnet /tmp/ref-liresnet --ref-bronet /tmp/ref-bronet/bronet \\
        --part a                                                 # (a): same weights, same outputs
    python bench/vs_hosts.py ... --part b --data-root DATA --work W  # (b) + (c): 2 seeds each side
    python bench/vs_hosts.py ... --part d --data-root DATA           # (d): training img/s

DATA holds ``cifar10-jpg`` (cll's data set of that name, ``tar xzf cifar10-jpg-full.tgz``). Written
against hukkai/liresnet 0c0611a and ntuaislab/BRONet 9d59c9b. Run by hand, never in CI; the figures
are in bench/README.md. One model size on both sides, cll's CPU size ``LiResNet-L2W32`` /
``BRONet-L2W32`` (depth 2, width 32, dense 256 x 2; BRONet: rank 16, Cholesky neck and dense as its
CIFAR configs), built on the reference side by its own builder:

* BRONet: ``BRONet(depth=2, width=32, dense_width=256, linear_num=2, backbone_type="bro",
  backbone_weight_rank_ratio=0.5, neck_conv_type="cholesky", neck_linear_type="cholesky",
  dense_type="cholesky")``, the keys of ``configs/benchmark_reproduce/cifar10.yaml``;
* LiResNet: ``GloroNet(depth=2, width=32)``, whose neck width (2048) and dense depth (8) are
  constants of its ``__init__``: its ``neck``, ``linear`` and ``head`` are replaced by its own
  classes ``Map2Vec(32, 16, 256)``, ``LiResMLP(256, depth=2)``, ``head(256, 10, use_lln=True)``.

(a) Parameters map one to one (``ref_to_cll``, ``cll_to_ref``; the stacked per-depth tensors of the
    reference are cll's per-layer ones): ``stem.0`` -> ``body.1``; ``conv.weights/gamma/bias/
    running_mean[i]`` -> ``body.{3+2i}``; ``neck.kernel`` -> the patch conv's ``weight`` and
    ``neck.weight/bias`` -> the neck dense layer; ``linear.weights/gamma/bias[j]`` -> the dense
    layers; ``head.weight`` -> the LLN head's free weight; the power iterates ``stem.0.init_x`` ->
    ``power.u0`` and (LiResNet) block i's slice of ``conv.init_x`` -> ``power.u{1+i}``. Where the
    parametrisations differ, the map is still the identity: the reference's MinMax is cll's
    ``MaxMinHalves`` (c sorted with c + n/2); its LiResConv folds the identity into the kernel at
    evaluation and adds x in training, as cll's LiResBlock; its BRO conv pads the canvas by one
    pixel, as cll's BROConv. Compared in float64, eval and train mode: the output of each of the
    reference's stages (stem, conv, neck, linear, head) against cll's body at the same depth, the
    gradients of every parameter under a random probe of the logits, the training estimate of K_F
    (``sub_lipschitz`` vs ``lipschitz.estimate_body``), and the loss: EMMA (``emma_loss``) and LA
    (``logit_annealing_loss``) of the reference against cll's, on the same model and input (value,
    every parameter's gradient) and on the same logits, head and K (value, dL/dz, dL/dW, dL/dK).
(b) The same short recipe on both sides, seeds 1 and 2: the first ``--train-images`` CIFAR-10
    training images (cifar10-jpg, no augmentation), ``--epochs`` epochs of batch 128 in the same
    order (cll's per-epoch shuffle, seed * 1000003 + epoch), NAdam lr 1e-3 (weight decay 0 /
    4e-5), constant rate, gradient clipped to norm 3, 10 power iterations per step, the recipes'
    training eps 0.1 eps -> 3 eps over the first half, per epoch (eps 36/255; LA: offset 2,
    temperature 0.75, gamma 5). No Lookahead on either side: the reference takes it from timm,
    which is not installed here (and cll's would differ only in its implementation). The
    reference is trained by a plain loop written here (its train.py needs DDP and GPUs) that calls
    its model, its ``sub_lipschitz`` and its loss function; cll by ``cll.train.train`` (the
    library path of ``cll train``). Then on the first 1000 test images, clean accuracy and CRA at
    36/255: the reference's own certificate (its validation rule ``trades_loss``, K from
    ``sub_lipschitz`` with 500 power iterations) and cll's sound one (``cll.certify.certify``),
    each on both sides' weights (mapped).
(c) From (b): on the reference-trained weights, the reference's certificate less cll's sound one,
    in points of CRA: what soundness costs.
(d) Training img/s at batch 128, one thread: ``--steps`` steps (after 2 untimed) of the reference
    step of (b) against cll's ``train.make_step``, alternating, ``--runs`` each, medians.

Differences found by (a), each measured there (docs/recipes.md lists them with the rest):

* the gradient of the training K_F: the reference runs its power iterations without gradient and
  differentiates only the last application to the detached iterate; cll differentiates through all
  10 iterations. Same K_F (1e-12), same loss (1e-14), but the parameters K_F depends on (stem,
  LiResNet's blocks) get gradients up to ~20 % apart; with K_F held constant on both sides every
  gradient agrees to 1e-13 (the rows "K_F held constant");
* BRONet's BRO conv: cll makes W_f exactly conjugate-symmetric on rfft2's self-conjugate columns and
  takes the real part of the shift's mean diagonal: rounding level (4e-16 in float64 here).

Running the reference code here (nothing of it is in this file: imported at run time from the
folders given, ``imported_from`` of bench/vs_forks.py, its modules dropped again afterwards):
``.cuda()`` a no-op (``forks_on_cpu``); ``einops`` (imported by BRONet's SOC, unused here) an empty
stand-in where not installed; ``torch.distributed.get_world_size`` answers 1 while no process group
exists (BRONet's dense layers ask it in their constructors; ``single_process``). No edits to its
files; avoided: both train.py (timm, DDP, GPUs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import cll.config
import cll.losses
import cll.models
from cll import certify as cll_certify
from cll import data, lipschitz, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_forks import forks_on_cpu, imported_from, rel, table

from bench import emit, log  # bench/ is not a package

F64 = torch.float64
EPS = 36 / 255
DEPTH, WIDTH, DENSE, DENSE_DEPTH, CLASSES = 2, 32, 256, 2, 10
ARCH = {"liresnet": "LiResNet-L2W32", "bronet": "BRONet-L2W32"}
LOSS = {"liresnet": "emma", "bronet": "logit_annealing"}
REF_LOSS = {"liresnet": "emma_loss", "bronet": "logit_annealing_loss"}
LA = dict(offset=2.0, temperature=0.75, gamma=5.0)  # the BRONet configs' loss keys
WEIGHT_DECAY = {"liresnet": 0.0, "bronet": 4e-5}
STUBS = ("einops",)


# ---------------------------------------------------------------- the parameter map (pure cll)
def key_pairs(depth: int = DEPTH, dense_depth: int = DENSE_DEPTH, conv_iterates: bool = True):
    """(reference key, index into its stacked tensor or None, cll key): the map of the module
    docstring. The block iterates are slices of ``conv.init_x`` (index ('x', i))."""
    pairs = [("stem.0.weight", None, "body.1.weight"), ("stem.0.bias", None, "body.1.bias")]
    for i in range(depth):
        for name in ("weights", "gamma", "bias", "running_mean"):
            pairs.append((f"conv.{name}", i, f"body.{3 + 2 * i}.{'weight' if name == 'weights' else name}"))
    patch = 3 + 2 * depth
    pairs += [
        ("neck.kernel", None, f"body.{patch}.weight"),
        ("neck.weight", None, f"body.{patch + 2}.weight"),
        ("neck.bias", None, f"body.{patch + 2}.bias"),
    ]
    for j in range(dense_depth):
        for name in ("weights", "gamma", "bias"):
            pairs.append((f"linear.{name}", j, f"body.{patch + 4 + 2 * j}.{'weight' if name == 'weights' else name}"))
    pairs += [
        ("head.weight", None, "head.parametrizations.weight.original"),
        ("head.bias", None, "head.bias"),
        ("stem.0.init_x", None, "power.u0"),
    ]
    if conv_iterates:
        pairs += [("conv.init_x", ("x", i), f"power.u{1 + i}") for i in range(depth)]
    return pairs


def _part(t: torch.Tensor, index, depth: int) -> torch.Tensor:
    if index is None:
        return t
    if isinstance(index, tuple):  # block i's channels of the grouped iterate (1, depth * c, H, W)
        c = t.shape[1] // depth
        return t[:, index[1] * c : (index[1] + 1) * c]
    return t[index]


def ref_to_cll(ref: dict, pairs) -> dict:
    """cll's tensors from the reference's (a state dict, or any dict of the same keys: gradients).
    Keys missing in ``ref`` are skipped."""
    depth = 1 + max((i[1] if isinstance(i, tuple) else -1) for _, i, _ in pairs)
    return {ours: _part(ref[theirs], i, max(depth, 1)) for theirs, i, ours in pairs if theirs in ref}


def cll_to_ref(ours: dict, like: dict, pairs) -> dict:
    """The reference's tensors (shapes of ``like``) from cll's: the inverse of ``ref_to_cll``."""
    depth = 1 + max((i[1] if isinstance(i, tuple) else -1) for _, i, _ in pairs)
    out = {k: v.clone() for k, v in like.items() if any(k == t for t, _, _ in pairs)}
    for theirs, i, key in pairs:
        if key not in ours or theirs not in out:
            continue
        if i is None:
            out[theirs] = ours[key].clone()
        else:
            _part(out[theirs], i, max(depth, 1)).copy_(ours[key])
    return out


def host_pairs(host: str):
    return key_pairs(conv_iterates=host == "liresnet")


@torch.no_grad()
def load_into_cll(model: nn.Module, ref_state: dict, host: str) -> None:
    state = model.state_dict()
    for key, value in ref_to_cll(ref_state, host_pairs(host)).items():
        state[key].copy_(value.reshape(state[key].shape))


@torch.no_grad()
def load_into_ref(ref: nn.Module, cll_state: dict, host: str) -> None:
    state = ref.state_dict()
    for key, value in cll_to_ref(cll_state, state, host_pairs(host)).items():
        state[key].copy_(value)
    ref.train(ref.training)  # the reference derives its evaluation weights in train(False)


# ---------------------------------------------------------------- the reference code, here
@contextlib.contextmanager
def single_process():
    """torch.distributed.get_world_size() -> 1 while no process group exists."""
    dist = torch.distributed
    saved = dist.get_world_size
    dist.get_world_size = lambda *a, **k: saved(*a, **k) if dist.is_initialized() else 1
    try:
        yield
    finally:
        dist.get_world_size = saved


@contextlib.contextmanager
def reference(root: Path):
    """The reference's ``models`` package, importable inside the context."""
    with imported_from(Path(root), stubs=STUBS), forks_on_cpu(), single_process():
        import models

        yield models


def build_ref(models, host: str) -> nn.Module:
    if host == "bronet":
        return models.BRONet(
            depth=DEPTH,
            width=WIDTH,
            input_size=32,
            num_classes=CLASSES,
            num_lc_iter=10,
            act_name="MinMax",
            use_lln=True,
            stem_kernel_size=5,
            backbone_type="bro",
            backbone_centering=True,
            backbone_weight_rank_ratio=0.5,
            neck_conv_type="cholesky",
            neck_linear_type="cholesky",
            dense_type="cholesky",
            dense_width=DENSE,
            linear_num=DENSE_DEPTH,
        )
    import models.blocks
    import models.model

    net = models.GloroNet(depth=DEPTH, width=WIDTH, input_size=32, num_classes=CLASSES, num_lc_iter=10)
    act = net.neck.activation
    net.neck = models.model.Map2Vec(feat_dim=WIDTH, feat_size=16, out_dim=DENSE, activation=act)
    net.linear = models.blocks.LiResMLP(num_features=DENSE, depth=DENSE_DEPTH, activation=act)
    net.head = models.model.head(DENSE, CLASSES, True)
    net.set_num_lc_iter()
    return net


def build_cll(host: str) -> nn.Module:
    return cll.models.create(ARCH[host], CLASSES, (3, 32, 32))


def ref_loss(models, host: str, model, x, y, eps, lc, return_loss=True):
    fn = getattr(models, REF_LOSS[host])
    return fn(model=model, x=x, label=y, eps=eps, lc=lc, return_loss=return_loss, num_classes=CLASSES, **LA)


def cll_cfg(host: str, **keys) -> cll.config.RunConfig:
    base = dict(
        dataset="cifar10-jpg",
        device="cpu",
        arch=ARCH[host],
        loss=LOSS[host],
        eps=EPS,
        optimizer="nadam",
        lr=1e-3,
        weight_decay=WEIGHT_DECAY[host],
        lookahead=False,
        schedule="constant",
        warmup_epochs=0.0,
        grad_clip=3.0,
        pi_iters=10,
        eps_warmup=0.5,
        emma_eps_start=0.1,
        emma_eps_end=3.0,
        lip_penalty=0.0,
        batch_size=128,
        augment=False,
        num_workers=0,
    )
    if host == "bronet":
        base.update(offset=LA["offset"], temperature=LA["temperature"], la_gamma=LA["gamma"])
    return cll.config.build_config({**base, **keys})


# ---------------------------------------------------------------- (a) same weights, same outputs
STAGES = ("stem", "conv", "neck", "linear", "head")


def cll_stage_layers(model: nn.Module) -> list[nn.Module]:
    patch = 3 + 2 * DEPTH
    body = model.body
    return [body[2], body[2 + 2 * DEPTH], body[patch + 3], body[patch + 3 + 2 * DENSE_DEPTH], model.head]


def stage_outputs(modules: list[nn.Module], model: nn.Module, x: torch.Tensor):
    """(the outputs of ``modules`` in ``model(x)``, in order; the logits)."""
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(o.detach())) for m in modules]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def grads(module: nn.Module) -> dict:
    return {k: p.grad for k, p in module.named_parameters() if p.grad is not None}


def grad_rows(label: str, ref: nn.Module, ours: nn.Module, host: str) -> list:
    mapped = ref_to_cll(grads(ref), host_pairs(host))
    mine = grads(ours)
    worst = max(mapped, key=lambda k: rel(mapped[k].reshape(mine[k].shape), mine[k]))
    return [label, rel(mapped[worst].reshape(mine[worst].shape), mine[worst]), worst, len(mapped)]


def part_a(models, host: str) -> None:
    torch.manual_seed(0)
    ref = build_ref(models, host).double()
    ours = build_cll(host).double()
    # move off the initialisation, so that gamma, the biases and the running means are not trivial
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05 * (p.abs().mean() + 0.1))
        ref.conv.running_mean.normal_(0, 0.05)
    load_into_cll(ours, ref.state_dict(), host)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(16, 3, 32, 32, generator=gen, dtype=F64)
    y = torch.randint(0, CLASSES, (16,), generator=gen)
    rows = []
    for mode in ("eval", "train"):
        ref.train(mode == "train")
        ours.train(mode == "train")
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        seen_ref, z_ref = stage_outputs([getattr(ref, s) for s in STAGES], ref, xr)
        seen_ours, z_ours = stage_outputs(cll_stage_layers(ours), ours, xo)
        for name, a, b in zip(STAGES, seen_ref, seen_ours):
            rows.append([f"{name} ({mode})", rel(a, b.reshape(a.shape)), (a - b.reshape(a.shape)).abs().max().item()])
        if mode == "train":
            probe = torch.randn(z_ref.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
            ref.zero_grad(), ours.zero_grad()
            (z_ref * probe).sum().backward()
            (z_ours * probe).sum().backward()
            rows.append(["dL/dx (train, probe)", rel(xr.grad, xo.grad), (xr.grad - xo.grad).abs().max().item()])
            g = grad_rows("", ref, ours, host)
            rows.append([f"param grads (train, probe): worst {g[2]} of {g[3]}", g[1], ""])
    rm = ref_to_cll({"conv.running_mean": ref.conv.running_mean}, host_pairs(host))
    worst = max(rel(v, ours.state_dict()[k]) for k, v in rm.items())
    rows.append(["running means after one train forward", worst, ""])
    table(["stage (mode)", "rel output", "max abs"], rows)

    # K_F in training: the reference's sub_lipschitz against cll's estimate_body, same iterates
    ref.train(), ours.train()
    load_into_cll(ours, ref.state_dict(), host)  # the iterates again: the forwards above moved none
    k_ref = ref.sub_lipschitz()
    k_ours = lipschitz.estimate_body(ours, 10)
    k_ref, k_ours = float(k_ref.detach()), k_ours.item()
    k_rows = [["K_F training estimate (10 iterations)", k_ref, k_ours, rel(k_ref, k_ours)]]

    # the losses: on the same model and input, and on the same logits / head / K
    loss_rows = []
    for name, eps in (("eps 36/255", EPS), ("eps 3 x 36/255", 3 * EPS)):
        crit = cll.losses.create(cll_cfg(host, epochs=1, eps=eps, emma_eps_start=1.0, emma_eps_end=1.0))
        for k_grad in (True, False):  # K_F with its gradient (each side's own), or held constant on both
            load_into_cll(ours, ref.state_dict(), host)
            ref.zero_grad(), ours.zero_grad()
            lc = ref.sub_lipschitz()
            k = lipschitz.estimate_body(ours, 10)
            if not k_grad:
                lc, k = (v.detach() if torch.is_tensor(v) else v for v in (lc, k))
            _, _, l_ref = ref_loss(models, host, ref, x, y, eps, lc)
            l_ours = crit(ours(x), y, ours.head.weight, k, 1.0)
            l_ref.backward(), l_ours.backward()
            g = grad_rows("", ref, ours, host)
            label = f"{REF_LOSS[host]}, model, {name}" + ("" if k_grad else ", K_F held constant")
            loss_rows.append([label, l_ref.item(), l_ours.item(), rel(l_ref, l_ours), g[1], g[2]])

        # the same logits, head rows and K on both sides (the reference reads them off a model)
        z = torch.randn(64, CLASSES, generator=torch.Generator().manual_seed(5), dtype=F64) * 3
        t = torch.randint(0, CLASSES, (64,), generator=torch.Generator().manual_seed(6))
        w0 = torch.randn(CLASSES, DENSE, generator=torch.Generator().manual_seed(8), dtype=F64)
        leaves = []
        for side in ("ref", "cll"):
            zz, ww, kk = (
                z.clone().requires_grad_(),
                w0.clone().requires_grad_(),
                torch.tensor(2.5, dtype=F64).requires_grad_(),
            )
            w = F.normalize(ww, dim=1)
            if side == "ref":
                fake = _Logits(zz, w)
                loss = ref_loss(models, host, fake, None, t, eps, kk)[2]
            else:
                loss = crit(zz, t, w, kk, 1.0)
            loss.backward()
            leaves.append((loss, zz.grad, ww.grad, kk.grad))
        (a, za, wa, ka), (b, zb, wb, kb) = leaves
        loss_rows.append(
            [
                f"{REF_LOSS[host]}, logits, {name}",
                a.item(),
                b.item(),
                rel(a, b),
                max(rel(za, zb), rel(wa, wb), rel(ka, kb)),
                "dL/dz, dL/dW, dL/dK",
            ]
        )
    table(["K_F", "reference", "cll", "rel"], k_rows)
    table(["loss", "reference", "cll", "rel loss", "max rel grad", "worst"], loss_rows)
    emit({"what": "a", "host": host, "stages": rows, "k": k_rows, "loss": loss_rows})


class _Logits(nn.Module):
    """What the reference's loss functions read off a model: ``model(x)`` and ``model.head.get_weight()``."""

    def __init__(self, z: torch.Tensor, w: torch.Tensor):
        super().__init__()
        self._z, self._w = z, w
        self.head = type("Head", (), {"get_weight": lambda _self: w})()

    def forward(self, x):
        return self._z


# ---------------------------------------------------------------- (b), (c): the same short recipe
def datasets(args):
    train_set, test_set, _ = data.load_dataset(
        "cifar10-jpg", root=args.data_root, augment=False, max_train=args.train_images, max_test=args.test_images
    )
    return train_set, test_set


def epoch_loader(train_set, batch: int, seed: int, epoch: int) -> DataLoader:
    """cll.train's loader of that epoch (same order, last partial batch dropped)."""
    order = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return DataLoader(train_set, batch_size=batch, shuffle=True, generator=order, drop_last=True, num_workers=0)


def ref_eps(epoch: int, epochs: int) -> float:
    """The reference's ``eps_fn`` (0.1 -> 3 x eps over the first half, per epoch)."""
    ratio = min(epoch / epochs * 2, 1)
    return EPS * (0.1 + (3.0 - 0.1) * ratio)


def ref_optimizer(ref: nn.Module, host: str) -> torch.optim.Optimizer:
    return torch.optim.NAdam(ref.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY[host])


def ref_step(models, host, ref, optimizer, x, y, eps):
    """One step of the reference's train.py loop (without the generated data, the scheduler and Lookahead)."""
    optimizer.zero_grad(set_to_none=True)
    lc = ref.sub_lipschitz()
    _, _, loss = ref_loss(models, host, ref, x, y, eps, lc)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 3.0)
    optimizer.step()
    return loss.detach()


def train_ref(models, host: str, seed: int, train_set, args) -> tuple[nn.Module, float, float]:
    torch.manual_seed(seed)
    ref = build_ref(models, host)
    optimizer = ref_optimizer(ref, host)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        ref.set_num_lc_iter(10)
        ref.train()
        total = n = 0.0
        for x, y in epoch_loader(train_set, 128, seed, epoch):
            loss = ref_step(models, host, ref, optimizer, x, y, ref_eps(epoch, args.epochs))
            total += loss.item() * len(y)
            n += len(y)
        seconds = time.perf_counter() - start
        log(f"  reference {host} seed {seed} epoch {epoch + 1}: loss {total / n:.4f} ({seconds:.0f} s)")
    return ref, total / n, time.perf_counter() - start


def test_batches(test_set, batch: int = 250):
    loader = DataLoader(test_set, batch_size=batch, shuffle=False, num_workers=0)
    return [(x, y) for x, y in loader]


@torch.no_grad()
def ref_certificate(models, host: str, ref: nn.Module, batches) -> dict:
    """The reference's validation: eval, 500 power iterations, the bottom-class rule (trades_loss)."""
    ref.eval()
    ref.set_num_lc_iter(500)
    lc = ref.sub_lipschitz()
    lc = lc.item() if torch.is_tensor(lc) else float(lc)
    correct = robust = n = 0
    for x, y in batches:
        z, z_, _ = models.trades_loss(ref, x=x, label=y, eps=EPS, lc=lc, return_loss=False)
        correct += (z.argmax(1) == y).sum().item()
        robust += (z_.argmax(1) == y).sum().item()
        n += len(y)
    ref.set_num_lc_iter(10)
    return {"clean": correct / n, "cra": robust / n, "lc": lc}


def sound_certificate(model: nn.Module, batches) -> dict:
    res = cll_certify.certify(model, batches, [EPS])
    return {"clean": res["clean_accuracy"], "cra": next(iter(res["cra"].values())), "lc": res["lipschitz_body"]}


def part_b(models, host: str, args) -> list[dict]:
    Path(args.work).mkdir(parents=True, exist_ok=True)  # the runs' scratch folders go inside
    train_set, test_set = datasets(args)
    batches = test_batches(test_set)
    records = []
    for seed in args.seeds:
        for side in ("reference", "cll"):
            log(f"(b) {host} seed {seed}: {side}")
            if side == "reference":
                ref, loss, seconds = train_ref(models, host, seed, train_set, args)
                ours = build_cll(host)
                load_into_cll(ours, ref.state_dict(), host)
            else:
                cfg = cll_cfg(
                    host,
                    seed=seed,
                    epochs=args.epochs,
                    data_root=str(args.data_root),
                    max_train=args.train_images,
                    max_test=args.test_images,
                )
                with tempfile.TemporaryDirectory(dir=args.work, prefix=f"{host}-{seed}-") as out:
                    start = time.perf_counter()
                    summary = train.train(cfg, out, log=lambda line: None)
                    wall = time.perf_counter() - start
                    _, ours = train.load_run(out)
                loss = summary["epochs"][-1]["loss"]
                seconds = sum(e["seconds"] for e in summary["epochs"])  # the epochs, not the final bound
                log(f"  cll {host} seed {seed}: loss {loss:.4f} ({seconds:.0f} s in epochs, {wall:.0f} s in all)")
                ref = build_ref(models, host)
                ref.train()
                load_into_ref(ref, ours.state_dict(), host)
            theirs = ref_certificate(models, host, ref, batches)
            sound = sound_certificate(ours, batches)
            rec = {
                "what": "b",
                "host": host,
                "side": side,
                "seed": seed,
                "train_loss": round(loss, 4),
                "train_seconds": round(seconds, 1),
                "clean": sound["clean"],
                "cra_reference_rule": theirs["cra"],
                "cra_sound": sound["cra"],
                "clean_reference_forward": theirs["clean"],
                "k_body_reference_estimate": round(theirs["lc"], 4),
                "k_body_sound": round(sound["lc"], 4),
                "soundness_cost_points": round(100 * (theirs["cra"] - sound["cra"]), 1),
            }
            emit(rec)
            records.append(rec)
    rows = [
        [
            r["side"],
            r["seed"],
            r["train_loss"],
            f"{100 * r['clean']:.1f}",
            f"{100 * r['cra_reference_rule']:.1f}",
            f"{100 * r['cra_sound']:.1f}",
            r["soundness_cost_points"],
            r["k_body_reference_estimate"],
            r["k_body_sound"],
            r["train_seconds"],
        ]
        for r in records
    ]
    table(
        [
            "trained by",
            "seed",
            "train loss",
            "clean %",
            "CRA ref. rule %",
            "CRA sound %",
            "(c) points",
            "K_F ref",
            "K_F sound",
            "s",
        ],
        rows,
    )
    summary = []
    for side in ("reference", "cll"):
        mine = [r for r in records if r["side"] == side]

        def span(key, scale=1.0, mine=mine):
            values = [scale * r[key] for r in mine]
            return f"{statistics.mean(values):.4g} [{min(values):.4g}, {max(values):.4g}]"

        summary.append(
            [side, span("train_loss"), span("clean", 100), span("cra_sound", 100), span("cra_reference_rule", 100)]
        )
        summary[-1].append(span("soundness_cost_points"))
    table(["trained by", "train loss", "clean %", "CRA sound %", "CRA ref. rule %", "(c) points"], summary)
    return records


# ---------------------------------------------------------------- (d) training speed
def part_d(models, host: str, args) -> dict:
    train_set, _ = datasets(args)
    loader = epoch_loader(train_set, 128, 0, 0)
    xs = [b for _, b in zip(range(args.steps + 2), loader)]
    if len(xs) < args.steps + 2:
        raise SystemExit(f"(d) needs {128 * (args.steps + 2)} training images, --train-images is {args.train_images}")
    eps = EPS * 0.1

    def run_ref() -> float:
        torch.manual_seed(0)
        ref = build_ref(models, host).train()
        opt = ref_optimizer(ref, host)
        for i, (x, y) in enumerate(xs):
            if i == 2:
                start = time.perf_counter()
            ref_step(models, host, ref, opt, x, y, eps)
        return 128 * args.steps / (time.perf_counter() - start)

    def run_cll() -> float:
        torch.manual_seed(0)
        cfg = cll_cfg(host, epochs=1)
        model = train.prepare_model(build_cll(host), cfg, torch.device("cpu"))
        model.train()
        step = train.make_step(
            cfg, model, cll.losses.create(cfg), train.make_optimizer(cfg, model), torch.device("cpu")
        )
        for i, (x, y) in enumerate(xs):
            if i == 2:
                start = time.perf_counter()
            step(*train.to_device(x, y, torch.device("cpu")), 0.0)
        return 128 * args.steps / (time.perf_counter() - start)

    speeds: dict[str, list[float]] = {"reference": [], "cll": []}
    load = [os.getloadavg()[0]]
    for run in range(args.runs):
        for side in ("reference", "cll") if run % 2 == 0 else ("cll", "reference"):
            v = run_ref() if side == "reference" else run_cll()
            speeds[side].append(round(v, 2))
            emit({"what": "d", "host": host, "side": side, "run": run, "img_per_s": round(v, 2)})
        load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in speeds.items()}
    k_ms = k_timings(models, host, args.steps)
    rec = {
        "what": "d_summary",
        "host": host,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "reference_img_per_s": med["reference"],
        "cll_img_per_s": med["cll"],
        "ratio_cll_to_reference": round(med["cll"] / med["reference"], 3),
        "runs": speeds,
        **k_ms,
        "load_avg_1min": [round(v, 2) for v in load],
    }
    emit(rec)
    table(
        ["host", "reference img/s", "cll img/s", "cll / reference", "K_F ms ref / cll"],
        [
            [
                host,
                med["reference"],
                med["cll"],
                rec["ratio_cll_to_reference"],
                f"{k_ms['reference_k_ms']} / {k_ms['cll_k_ms']}",
            ]
        ],
    )
    return rec


def k_timings(models, host: str, reps: int) -> dict:
    """The training K_F alone, forward and backward, per step (ms, median of ``reps``): the
    reference's ``sub_lipschitz`` (gradient through the last application) and cll's
    ``estimate_body`` (gradient through all 10 iterations)."""
    torch.manual_seed(0)
    ref = build_ref(models, host).train()
    cfg = cll_cfg(host, epochs=1)
    ours = train.prepare_model(build_cll(host), cfg, torch.device("cpu")).train()

    def timed(fn) -> float:
        times = []
        for _ in range(reps + 2):
            start = time.perf_counter()
            fn().backward()
            times.append(time.perf_counter() - start)
        return round(1000 * statistics.median(times[2:]), 2)

    return {
        "reference_k_ms": timed(lambda: torch.as_tensor(ref.sub_lipschitz()) * 1.0),
        "cll_k_ms": timed(lambda: lipschitz.estimate_body(ours, 10)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-liresnet", type=Path, help="hukkai/liresnet (the folder holding models/)")
    ap.add_argument("--ref-bronet", type=Path, help="ntuaislab/BRONet's bronet/ (the folder holding models/)")
    ap.add_argument("--host", choices=("liresnet", "bronet", "all"), default="all")
    ap.add_argument("--part", choices=("a", "b", "d", "all"), default="a", help="b includes (c)")
    ap.add_argument("--data-root", type=Path, help="the folder holding cifar10-jpg (b, d)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for cll's runs (default: the temp dir)")
    ap.add_argument("--train-images", type=int, default=5000)
    ap.add_argument("--test-images", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=40, help="(d): timed steps per run")
    ap.add_argument("--runs", type=int, default=3, help="(d): alternating runs per side")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part in ("b", "d", "all") and args.data_root is None:
        ap.error("--part b/d need --data-root")
    hosts = ("liresnet", "bronet") if args.host == "all" else (args.host,)
    for host in hosts:
        root = args.ref_liresnet if host == "liresnet" else args.ref_bronet
        if root is None:
            ap.error(f"--ref-{host} is needed")
        with reference(root) as models:
            print(f"## {host}: {ARCH[host]} against {root}\n", flush=True)
            if args.part in ("a", "all"):
                part_a(models, host)
            if args.part in ("b", "all"):
                part_b(models, host, args)
            if args.part in ("d", "all"):
                part_d(models, host, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
