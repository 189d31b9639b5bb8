#!/usr/bin/env python
"""cll against the code bases it reimplements, layer by layer and loss by loss, from the same weights.

    python bench/vs_forks.py --ref REF --family gloro          # (a) 4C3F + GloroLoss: values, gradients, 5 steps
    python bench/vs_forks.py --ref REF --family all            # gloro, sll, cpl, soc
    python bench/vs_forks.py --ref REF --family gloro --cifar DIR/cifar-10-batches-py

REF holds the folders of github.com/mlosch/CLL: ``unconstrained/`` (the CLL reference) made runnable
by ``shared/bench-ref/prepare.sh GIT_DIR REF``, and the forks ``soc/``, ``cpl/``, ``sll/`` exported
beside it (``git -C GIT_DIR archive HEAD soc cpl sll | tar -x -C REF``). Nothing of it is part of
this file: each family's code is imported at run time from there (``imported_from``), and its
modules are dropped again afterwards, so that the forks' equally named modules (``model``,
``layers``, ``utils``) do not meet. Run by hand, never in CI; the figures are in bench/README.md.

Running the forks on a CPU with the current packages takes two shims (``forks_on_cpu``), active only
while a fork's code runs: ``.cuda()`` of tensors and modules returns them unchanged and
``torch.randn(..., device='cuda')`` draws on the CPU (SOC builds its layers on the GPU, the SLL and
CPL losses move their inputs there); and modules the forks import but never use here (apex,
advertorch, autoattack, pytorch_warmup, imageio, tqdm, CPL's data pipeline) are empty stand-ins
where they are not installed. einops, which SOC uses for its stride-2 folding only, is stood in for
by a function that performs that one rearrangement ("b c (w k1) (h k2) -> b (c k1 k2) w h") with
reshape/permute. Float64 comparisons run the forks with float64 as torch's default dtype (their
channel padding allocates its output with the default dtype).

Parameter maps (fork -> cll), applied by the functions below. Where cll follows a fork, the map is
one to one and both sides run the fork's own choice:

GloRo (4C3F)  conv1..conv4, fc1, fc2, fc (each ``.parent``) -> ``body[0, 2, 4, 6, 9, 11]``, ``head``;
              the power iterates ``power_iterate`` <-> ``model.power.u0..u5``.
SLL           kernel / weights -> weight, bias -> bias, q -> q (both weight by |q|; gradients equal
              directly).
CPL           kernel / weights -> weight, bias -> bias, the power iterate ``pm.u`` -> ``u`` (both
              train with sigma = <W u_1, v_0>, gradient through both factors).
SOC           random_conv_filter -> weight, bias -> bias; the fork's singular vectors of the four
              reshapes, the one over the rows (output side: v1, v2, v3, u4) -> cll's u0..u3, the one
              over the columns (u1, u2, u3, v4) -> v0..v3, flattened; its training-forward counter
              ``total_iters`` -> ``steps`` (both: 50 iterations at every 200th, 1 otherwise); the
              evaluation series gets the fork's 12 terms (cll's own 15 in the rows "cll's 15
              terms"); HH1: theta -> theta (both keep a pair where a sin(theta/2) - b cos(theta/2)
              <= 0).
Heads         vanilla ``nn.Linear`` heads map one to one; LLN heads (unit rows) likewise, through
              cll's parametrisation's free weight; the truncation head (the first C features, the
              forks' ``PoolingLinear(agg="trunc")`` and cll's ``head: trunc``) has no parameters.

Per family, what cll follows and the differences found are printed after the figures (``known``),
each difference measured: once as the code bases have it and once with the setting mapped or
matched, so that what remains is float rounding. The two changes to reference code are
diagnostics, each active only in the rows that name it: the GloRo rows "full-size" run the
reference's conv power iteration with the transposed convolution's output_padding set (see
``_power_iteration_full_size``; the rows "as is" run its own), and the CPL rows "fork's W u on a
copy of u" run the fork's dense power iteration with its iterate copied before W u (see
``_compute_dense_on_copy``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.machinery
import math
import pickle
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import cll.config
import cll.losses
import cll.models
import cll.models.peers
from cll import layers as L
from cll import lipschitz, train
from cll.layers.soc import INIT_ITERS as SOC_INIT_ITERS
from cll.layers.soc import four_reshapes

F64, F32 = torch.float64, torch.float32


# ---------------------------------------------------------------- report helpers
def out(line: str = "") -> None:
    print(line, flush=True)


def rel(a, b) -> float:
    """max |a - b| / max |a| (0 where both are 0): the relative difference of two tensors or numbers."""
    a, b = (t.detach().double() if torch.is_tensor(t) else torch.tensor(t, dtype=F64) for t in (a, b))
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def table(header: list[str], rows: list[list]) -> None:
    """A Markdown table on stdout: relative differences (columns named 'rel ...' or 'max rel ...') as
    %.1e, other floats as %.6g."""

    def cell(name: str, value) -> str:
        if isinstance(value, float):
            return f"{value:.1e}" if name.startswith("rel") or name.startswith("max rel") else f"{value:.6g}"
        return str(value)

    out("| " + " | ".join(header) + " |")
    out("|" + "---|" * len(header))
    for row in rows:
        out("| " + " | ".join(cell(h, v) for h, v in zip(header, row)) + " |")
    out()


def known(lines: list[str], followed: list[str] | None = None) -> None:
    """What cll follows of the fork (compared one to one above) and what still differs."""
    if followed:
        out("Followed by cll (mapped one to one, the fork's choice on both sides in the rows above):")
        for line in followed:
            out(f"  - {line}")
    out("Differences (measured here, not fixed; 'Not in the issue's list': found by this comparison):")
    for line in lines:
        out(f"  - {line}")
    out()


# ---------------------------------------------------------------- running the forks' code here
STUBS = ("apex", "advertorch", "advertorch.attacks", "autoattack", "pytorch_warmup", "imageio", "tqdm")


def _rearrange(x: torch.Tensor, pattern: str, **sizes) -> torch.Tensor:
    """The one einops rearrangement SOC uses (stride-2 folding of 2x2 pixel blocks into channels)."""
    if " ".join(pattern.split()) != "b c (w k1) (h k2) -> b (c k1 k2) w h":
        raise NotImplementedError(f"einops stand-in: only SOC's folding, not {pattern!r}")
    k1, k2 = sizes["k1"], sizes["k2"]
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, hh // k1, k1, ww // k2, k2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, c * k1 * k2, hh // k1, ww // k2)


def _stub(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # what find_spec reads of it

    def missing(attr: str):  # any name the fork imports from it: unused here
        if attr.startswith("__"):
            raise AttributeError(attr)
        return None

    module.__getattr__ = missing
    if name == "einops":
        module.rearrange = _rearrange
    return module


@contextlib.contextmanager
def imported_from(root: Path, stubs: tuple[str, ...] = (), replace: tuple[str, ...] = ()):
    """``root`` first on sys.path, stand-ins for ``stubs`` that are not installed and for the fork's
    own modules ``replace``; on exit every module loaded from ``root`` and every stand-in is dropped
    from sys.modules again."""
    saved_path, saved_modules = list(sys.path), {name: sys.modules.get(name) for name in replace}
    sys.path.insert(0, str(root))
    added = list(replace)
    for name in replace:
        sys.modules[name] = _stub(name)
    for name in stubs:
        if name in sys.modules:
            continue
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = _stub(name)
            added.append(name)
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in added:
            sys.modules.pop(name, None)
        for name, module in saved_modules.items():
            if module is not None:
                sys.modules[name] = module
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", "") or "").startswith(str(root)):
                del sys.modules[name]


@contextlib.contextmanager
def forks_on_cpu(dtype: torch.dtype = F32):
    """.cuda() as a no-op, randn(device='cuda') on the CPU, and ``dtype`` as the default dtype."""
    saved = torch.Tensor.cuda, nn.Module.cuda, torch.randn, torch.get_default_dtype()
    randn = torch.randn

    def cpu_randn(*args, **kw):
        if str(kw.get("device", "cpu")).startswith("cuda"):
            kw.pop("device")
        return randn(*args, **kw)

    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.randn = cpu_randn
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda, torch.randn = saved[:3]
        torch.set_default_dtype(saved[3])


def quiet():
    """The forks print as they build: to stderr."""
    return contextlib.redirect_stdout(sys.stderr)


# ---------------------------------------------------------------- data
def cifar_batches(folder: Path | None, n: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of CIFAR-10 training images in [0, 1] (the first n * batch of data_batch_1, no
    augmentation), or random images and labels where ``folder`` is None."""
    if folder is None:
        gen = torch.Generator().manual_seed(seed)
        return [
            (torch.rand(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(n)
        ]
    with open(Path(folder) / "data_batch_1", "rb") as f:
        raw = {k.decode() if isinstance(k, bytes) else k: v for k, v in pickle.load(f, encoding="bytes").items()}
    images = torch.tensor(raw["data"][: n * batch]).reshape(-1, 3, 32, 32).float() / 255
    labels = torch.tensor(raw["labels"][: n * batch])
    return [(images[i * batch : (i + 1) * batch], labels[i * batch : (i + 1) * batch]) for i in range(n)]


def run_config(**keys) -> cll.config.RunConfig:
    return cll.config.build_config({"dataset": "cifar10", "device": "cpu", **keys})


# ---------------------------------------------------------------- (a) GloRo: the CLL reference
GLORO_CONFIG = "config/cifar10_gloro_eps_sweep"
GLORO_SEED_FILE = "4C3F_gloroeps0to0.15p5*.yaml"  # eps 0 -> 0.15 over training; used here at 0.15
PI_ITERS = 5  # the config's GloroLoss num_iter = cll's pi_iters
GLORO_NAMES = ("conv1", "conv2", "conv3", "conv4", "fc1", "fc2", "fc")  # the reference's layer names


def cll_recipe(arch: str, c: dict) -> cll.config.RunConfig:
    """cll's run config of a fork's CLL script (``c``: its eps, p, delta and lambda): pairwise CLL,
    the K penalty in the forks' per-batch form."""
    return run_config(
        arch=arch,
        loss="cll",
        eps=c["eps"],
        p=c["p"],
        delta=c["delta"],
        cll_form="pairwise",
        lip_penalty=c["lam"],
        lip_penalty_form="batch",
    )


def reference_4c3f(root: Path, dtype: torch.dtype, state: dict | None = None):
    """The reference's 4C3F with its GloroLoss, built by its own config loader and model builder from
    the eps-sweep config (metrics and evaluations left out: they are not part of the loss), eps fixed
    at the config's end value; with ``state`` loaded (the reference's state_dict) and in ``dtype``.
    Returns (model, config path, eps, optimizer settings)."""
    from lib import config as ref_config
    from model import model_builder

    path = sorted((root / GLORO_CONFIG).glob(GLORO_SEED_FILE))[0]
    cfg = ref_config.load_cfg_from_cfg_file(str(path))
    cfg.pop("metrics", None)
    cfg.pop("evaluations", None)
    eps = float(cfg["loss"]["gloro"]["epsilon"]["end_val"])
    opt = {k: v for k, v in cfg["training"]["optimizer"].items() if k != "type"}
    assert cfg["training"]["optimizer"]["type"] == "AdamW"
    assert cfg["loss"]["gloro"]["num_iter"] == PI_ITERS
    with quiet():
        model = model_builder.build(cfg)
        model._forward_pass(torch.zeros(1, 3, 32, 32))  # sizes the power iterates (the reference's _setup)
    for scheduler in model.loss["gloro"].schedulerlist:  # the eps schedule, held at its end value
        scheduler.val = eps
    if state is not None:
        model.load_state_dict(state)
    return model.to(dtype).train(), path, eps, opt


def reference_layers(ref: nn.Module) -> list[nn.Module]:
    """The reference's computers of conv/linear layers in order (the classifier last)."""
    return [c for c in ref.children() if isinstance(getattr(c, "parent", None), (nn.Conv2d, nn.Linear))]


def cll_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.body if type(m) in (nn.Conv2d, nn.Linear)] + [model.head]


@torch.no_grad()
def gloro_map(ref: nn.Module, model: nn.Module) -> list[tuple[str, str]]:
    """Copy the reference's weights into cll's 4C3F and cll's power iterates into the reference's
    (so both iterate from the same vectors); the reference's whole-model estimate is marked as
    initialised, so that its first call runs num_iter iterations, not one (see ``known``)."""
    names = dict(model.named_modules())
    pairs = []
    for computer, layer in zip(reference_layers(ref), cll_layers(model)):
        assert computer.parent.weight.shape == layer.weight.shape
        layer.weight.copy_(computer.parent.weight)
        layer.bias.copy_(computer.parent.bias)
        ref_name = next(n for n, c in ref.named_children() if c is computer)
        pairs.append((ref_name, next(n for n, m in names.items() if m is layer)))
    for computer, u in zip(reference_layers(ref)[:-1], model.power.iterates()):
        computer.power_iterate = u.clone()
    ref.lip_estimate = torch.ones_like(ref.lip_estimate)
    return pairs


def gloro_cll_config(head_gradient: bool, eps: float, opt: dict) -> cll.config.RunConfig:
    return run_config(
        arch="4C3F",
        loss="gloro",
        eps=eps,
        eps_warmup=0.0,  # eps held at its end value, as on the reference side
        gloro_head_gradient=head_gradient,
        lip_penalty=0.0,  # the config has GloroLoss alone (no GlobalLipschitzDecay)
        pi_iters=PI_ITERS,
        optimizer="adamw",
        lr=float(opt["lr"]),
        weight_decay=float(opt["weight_decay"]),
    )


def reference_pass(ref: nn.Module, x, y):
    """The reference's model(x, y) as tool/train.py calls it: (logits, loss, K_F of the body)."""
    outputs = ref(x, y)
    loss = sum(torch.mean(v) for v in outputs["loss"].values())
    k_body = math.prod(float(c.lip_estimate) for c in reference_layers(ref)[:-1])
    return outputs["prediction"], loss, k_body


def cll_pass(model: nn.Module, criterion, x, y):
    """The loss part of cll's training step (train.make_step, without the optimizer): (logits, loss, K_F)."""
    k_body = lipschitz.estimate_body(model, PI_ITERS)
    logits = model.head(model.body(x))
    return logits, criterion(logits, y, model.head.weight, k_body, 1.0), k_body.item()


def _power_iteration_full_size(self, num_iter, W, running_power_iterate):
    """The reference's Conv2dLipschitzComputer.power_iteration with the transposed convolution's
    output_padding set so that A^T returns the input's size (the adjoint of A): for a stride-2
    layer the reference's own iterate loses a row and a column on its first iteration (32x32 ->
    31x31) and iterates on that smaller operator from then on."""
    x = running_power_iterate
    conv = self.parent
    for _ in range(num_iter):
        y = F.conv2d(x, W, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        restored = [
            n - ((m - 1) * s - 2 * p + d * (k - 1) + 1)
            for n, m, s, p, d, k in zip(x.shape[2:], y.shape[2:], conv.stride, conv.padding, conv.dilation, W.shape[2:])
        ]
        x_ = F.conv_transpose2d(
            y, W, stride=conv.stride, padding=conv.padding, output_padding=restored, dilation=conv.dilation
        )
        x = x_ / torch.norm(x_, p=self.norm_p)
    return x


@contextlib.contextmanager
def full_size_iterates(ref: nn.Module, on: bool):
    """With ``on``, the reference's conv power iteration keeps its iterate at the layer's input size
    (``_power_iteration_full_size``, a diagnostic patch of the reference class while it runs)."""
    cls = type(reference_layers(ref)[0])
    saved = cls.power_iteration
    if on:
        cls.power_iteration = _power_iteration_full_size
    try:
        yield
    finally:
        cls.power_iteration = saved


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def iterate_difference(ref: nn.Module, model: nn.Module) -> str:
    """Largest relative difference of the updated iterates, over the layers where both have one size."""
    pairs = [(c.power_iterate, u) for c, u in zip(reference_layers(ref)[:-1], model.power.iterates())]
    same = [rel(a, b) for a, b in pairs if a.shape == b.shape]
    return f"{max(same):.1e}" + ("" if len(same) == len(pairs) else f" ({len(pairs) - len(same)} layers 31x31)")


def gloro_once(root: Path, states, x, y, eps, opt, dtype, full: bool, head_gradient: bool) -> dict:
    """Logits, loss, K_F and every gradient of both sides for one batch from the same state."""
    ref = reference_4c3f(root, dtype, states[0])[0]
    model = cll.models.create("4C3F", 10, (3, 32, 32)).to(dtype)
    model.load_state_dict(states[1])
    criterion = cll.losses.create(gloro_cll_config(head_gradient, eps, opt))
    with full_size_iterates(ref, full):
        z_ref, loss_ref, k_ref = reference_pass(ref, x.to(dtype), y)
    z, loss, k = cll_pass(model, criterion, x.to(dtype), y)
    loss_ref.backward()
    loss.backward()
    grads = {
        f"{n}.{p}": rel(getattr(c.parent, p).grad, getattr(l, p).grad)
        for n, c, l in zip(GLORO_NAMES, reference_layers(ref), cll_layers(model))
        for p in ("weight", "bias")
    }
    return dict(
        logits=rel(z_ref, z),
        loss=rel(loss_ref, loss),
        k=rel(k_ref, k),
        k_ref=k_ref,
        k_cll=k,
        iterates=iterate_difference(ref, model),
        grads=grads,
    )


def gloro(args) -> None:
    root = args.ref / "unconstrained"
    out("## (a) GloRo: 4C3F + GloroLoss of the CLL reference (unconstrained/) against cll")
    out()
    with imported_from(root, ("autoattack",)):
        torch.manual_seed(0)
        ref, path, eps, opt = reference_4c3f(root, F32)
        model = cll.models.create("4C3F", 10, (3, 32, 32))
        pairs = gloro_map(ref, model)
        states = copy.deepcopy(ref.state_dict()), copy.deepcopy(model.state_dict())
        out(
            f"config: {path.relative_to(args.ref)}; eps = {eps} (the schedule's end value), "
            f"AdamW {opt}, {PI_ITERS} power iterations per step"
        )
        out("map: " + ", ".join(f"{a} -> {b}" for a, b in pairs) + "; power_iterate <- model.power.u0..u5")
        out(
            "reference 'full-size': its conv power iteration patched (here, as a diagnostic) to keep the "
            "iterate at the layer's input size; 'as is': the reference's own code"
        )
        out()
        (x, y), *_ = cifar_batches(args.cifar, 1, args.batch, seed=1)
        data = f"{'CIFAR-10 training images' if args.cifar else 'random images'}"
        out(f"One batch of {args.batch} {data}, the same weights and iterates, loss and gradient once:")
        runs = [
            (dtype, full, head_gradient)
            for dtype in (F64, F32)
            for full in (True, False)
            for head_gradient in (True, False)
        ]
        results = [gloro_once(root, states, x, y, eps, opt, *run) for run in runs]
        rows = []
        for (dtype, full, head_gradient), r in zip(runs, results):
            worst = max(r["grads"], key=r["grads"].get)
            rows.append(
                [
                    _name(dtype),
                    "full-size" if full else "as is",
                    head_gradient,
                    r["logits"],
                    r["loss"],
                    r["k"],
                    r["iterates"],
                    r["grads"][worst],
                    worst,
                ]
            )
        table(
            [
                "dtype",
                "reference",
                "cll gloro_head_gradient",
                "rel logits",
                "rel loss",
                "rel K_F",
                "rel iterates",
                "max rel grad",
                "worst parameter",
            ],
            rows,
        )
        f32_as_is = results[runs.index((F32, False, True))]
        out(f"K_F (float32): reference as is {f32_as_is['k_ref']:.7g}, cll {f32_as_is['k_cll']:.7g}")
        out()
        out("Relative difference of each parameter's gradient to the reference's:")
        header = ["parameter"] + [
            f"rel {_name(d)} {'full' if f else 'as-is'} hg={'on' if h else 'off'}" for d, f, h in runs
        ]
        table(header, [[p] + [r["grads"][p] for r in results] for p in results[0]["grads"]])

        gloro_converged(root, states)
        batches = cifar_batches(args.cifar, args.steps, args.batch, seed=2)
        for dtype in (F32, F64):
            gloro_training(root, states, batches, eps, opt, dtype)
    known(
        [
            "stride-2 convs (conv2, conv4): the reference's power iteration applies conv_transpose2d without "
            "output_padding, so its iterate becomes 31x31 (15x15) after the first iteration and it "
            "estimates the norm of the conv on that smaller input (a lower value: the last row and column "
            "are never seen); cll iterates on the true operator at 32x32 (16x16). Not in the issue's list.",
            "the reference's first call of its whole-model estimate runs 1 power iteration, not num_iter "
            "(lip_estimate starts NaN: lipschitz_model.py, LipschitzModel.lipschitz_estimate); cll runs "
            "pi_iters from the first step. Matched here by marking the reference's estimate as initialised.",
            "the reference's iterates start as randn (unnormalised); cll's as a unit vector. Matched: the "
            "reference gets cll's (power iteration is scale-free).",
            "sigma: the reference divides by sqrt(|u|^2 + 1e-9), cll by |u| + 1e-12 (u unit): K_F differs "
            "by ~3e-9 relative over 6 layers, visible in float64 only.",
            "eps: the reference ramps eps 0 -> 0.15 (power 5) over all 801 epochs, as cll's eps_warmup 1 (its "
            "default) does. Held at 0.15 on both sides here.",
            "MaxMin at exact ties (a == b): the reference's max/min over a dim send the gradient to one "
            "member, cll's to both halves (autograd's rule for maximum/minimum); none in these batches "
            "(the gradients agree).",
        ]
    )


@torch.no_grad()
def gloro_converged(root: Path, states, iters: int = 1000) -> None:
    """Each layer's norm estimate after ``iters`` power iterations from the same start (float64):
    the reference's own code (as is and full-size) against cll's epoch-end routine (power.converge
    with the same count and a tolerance of 1e-13)."""
    model = cll.models.create("4C3F", 10, (3, 32, 32)).double()
    model.load_state_dict(states[1])
    ours = model.power.converge(tol=1e-13, max_iter=iters)
    columns = []
    for full in (False, True):
        ref = reference_4c3f(root, F64, states[0])[0]
        with full_size_iterates(ref, full):
            columns.append([float(c.estimate(iters)) for c in reference_layers(ref)[:-1]])
    rows = [[n, a, b, c, rel(c, a), rel(c, b)] for n, a, b, c in zip(GLORO_NAMES, *columns, ours)]
    rows.append(
        [
            "K_F (product)",
            math.prod(columns[0]),
            math.prod(columns[1]),
            math.prod(ours),
            rel(math.prod(ours), math.prod(columns[0])),
            rel(math.prod(ours), math.prod(columns[1])),
        ]
    )
    out(f"Per-layer norm estimates after {iters} power iterations from the same start (float64):")
    table(["layer", "reference as is", "reference full-size", "cll", "rel as-is", "rel full-size"], rows)


def replicated_step(model, criterion, optimizer, x, y, progress):
    """train.make_step's step for lip_penalty 0 without amp, in the model's dtype."""
    _, loss, _ = cll_pass(model, criterion, x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), None


def gloro_training(root: Path, states, batches, eps: float, opt: dict, dtype: torch.dtype) -> None:
    """``len(batches)`` AdamW steps from the same weights and iterates: the reference's step
    (tool/train.py: model(x, y), mean loss, zero_grad, backward, step), as is and full-size,
    against cll's own training step (``train.make_step``: K_F by estimate_body, body, head, loss,
    backward, optimizer step) with and without the head gradient; cll's model in the default memory
    layout, as the reference's (the trainer moves image models to channels-last first)."""
    refs = {}
    for full in (False, True):
        ref = reference_4c3f(root, dtype, states[0])[0]
        refs[full] = (ref, torch.optim.AdamW(ref.parameters(), **opt))
    sides = {}
    for head_gradient in (True, False):
        cfg = gloro_cll_config(head_gradient, eps, opt)
        m = cll.models.create("4C3F", 10, (3, 32, 32)).to(dtype)
        m.load_state_dict(states[1])
        criterion, optimizer = cll.losses.create(cfg), train.make_optimizer(cfg, m)
        if dtype == F32:
            step = train.make_step(cfg, m, criterion, optimizer, torch.device("cpu"))
        else:  # make_step runs the head on features.float() (its amp path): its operations, in float64
            step = functools.partial(replicated_step, m, criterion, optimizer)
        sides[head_gradient] = (m, step)
    rows = []
    for i, (x, y) in enumerate(batches):
        x = x.to(dtype)
        losses = {}
        for full, (ref, optimizer) in refs.items():
            with full_size_iterates(ref, full):
                _, loss, _ = reference_pass(ref, x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[full] = loss.item()
        row = [i + 1, losses[False], losses[True]]
        for head_gradient in (True, False):
            m, step = sides[head_gradient]
            loss = step(x, y, 1.0)[0].item()
            params = {
                f"{n}.{p}": rel(getattr(c.parent, p), getattr(l, p))
                for n, c, l in zip(GLORO_NAMES, reference_layers(refs[True][0]), cll_layers(m))
                for p in ("weight", "bias")
            }
            worst = max(params, key=params.get)
            row += [loss, rel(losses[False], loss), rel(losses[True], loss), f"{params[worst]:.1e} {worst}"]
        rows.append(row)
    out(
        f"{len(batches)} AdamW steps in {_name(dtype)} from the same state, batches of {len(batches[0][1])}: "
        "losses side by side (rel: to the reference as is / full-size; params: the largest relative "
        "difference of a parameter tensor to the full-size reference's after the step, and which)"
        + (":" if dtype == F32 else "; cll's step replicated (make_step computes its head in float32):")
    )
    table(
        [
            "step",
            "reference",
            "reference full-size",
            "cll hg=on",
            "rel as-is",
            "rel full",
            "max rel params",
            "cll hg=off",
            "rel as-is ",
            "rel full ",
            "max rel params ",
        ],
        rows,
    )


# ---------------------------------------------------------------- (b) the forks: shared steps
class Pair:
    """A fork's parameter and cll's, with the map of the fork's gradient onto cll's parametrisation."""

    def __init__(self, name: str, fork: torch.Tensor, ours: torch.Tensor, grad_map=None):
        self.name, self.fork, self.ours = name, fork, ours
        self.grad_map = grad_map or (lambda grad, param: grad)

    def grad_difference(self) -> float:
        return rel(self.grad_map(self.fork.grad, self.fork.detach()), self.ours.grad)


def probe_pass(module: nn.Module, x: torch.Tensor):
    """module(x) and, in training mode, the backward of <probe, module(x)> for a fixed random probe
    (a generic linear functional, so that every gradient is exercised): (output, dL/dx or None)."""
    x = x.clone().requires_grad_(module.training)
    y = module(x)
    if not module.training:
        return y.detach(), None
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    (y * probe).sum().backward()
    return y.detach(), x.grad


def layer_rows(label: str, fork: nn.Module, ours: nn.Module, pairs: list[Pair], x: torch.Tensor) -> list:
    """One table row: output and input-gradient differences and the worst parameter gradient."""
    for p in pairs:
        p.fork.grad = p.ours.grad = None
    y_fork, g_fork = probe_pass(fork, x)
    y_ours, g_ours = probe_pass(ours, x)
    if g_fork is None:
        return [label, rel(y_fork, y_ours), "", "", ""]
    worst = max(pairs, key=Pair.grad_difference)
    return [label, rel(y_fork, y_ours), rel(g_fork, g_ours), worst.grad_difference(), worst.name]


LAYER_HEADER = ["layer, setting", "rel output", "rel dL/dx", "max rel param grad", "worst parameter"]


def model_pairs(fork_layers, our_layers, map_layer) -> list[Pair]:
    """``map_layer(fork, ours, prefix)`` over two equally long lists of layers."""
    assert len(fork_layers) == len(our_layers), (len(fork_layers), len(our_layers))
    return [p for i, (f, o) in enumerate(zip(fork_layers, our_layers)) for p in map_layer(f, o, f"{i}.")]


@torch.no_grad()
def map_linear(fork: nn.Linear, ours: nn.Linear, prefix: str = "head.") -> list[Pair]:
    """A plain (or LLN: through its free weight) linear head."""
    params = getattr(ours, "parametrizations", None)
    weight = params.weight.original if params is not None else ours.weight
    weight.copy_(fork.weight)
    ours.bias.copy_(fork.bias)
    return [Pair(prefix + "weight", fork.weight, weight), Pair(prefix + "bias", fork.bias, ours.bias)]


def loss_rows(label, fork_loss, our_loss, pairs: list[Pair], logits_fork, logits_ours) -> list:
    """Loss values and every parameter gradient of two scalar losses of the mapped models."""
    for p in pairs:
        p.fork.grad = p.ours.grad = None
    fork_loss.backward()
    our_loss.backward()
    worst = max(pairs, key=Pair.grad_difference)
    return [
        label,
        fork_loss.item(),
        our_loss.item(),
        rel(fork_loss, our_loss),
        rel(logits_fork, logits_ours),
        worst.grad_difference(),
        worst.name,
    ]


LOSS_HEADER = ["loss", "fork", "cll", "rel loss", "rel logits", "max rel param grad", "worst parameter"]


def cll_loss_of(cfg, model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What cll's training step adds up: the loss on (logits, K_F) plus the K penalty."""
    k_body = lipschitz.estimate_body(model, cfg.pi_iters)
    loss = cll.losses.create(cfg)(logits, y, model.head.weight, k_body, 1.0)
    if cfg.lip_penalty > 0:
        loss = loss + cll.losses.lipschitz_penalty(
            k_body, model.head.weight, cfg.lip_penalty, cfg.lip_pow, y, cfg.lip_penalty_form
        )
    return loss


def auto_head(cfg: cll.config.RunConfig) -> str:
    """The head a run of ``cfg`` trains (as ``train.build_model`` picks it: head auto, the loss's own)."""
    return cll.losses.create(cfg).head if cfg.head == "auto" else cfg.head


def cll_loss_row(c: dict, fork_loss, cll_cfg, fork_model, model, pairs: list[Pair], x, y) -> list:
    """The loss row of a fork's CLL script (``c``) against cll's ``cll_cfg``, both models on ``x``
    with vanilla heads."""
    z_fork, z = fork_model(x), model(x)
    label = f"CLL eps {c['eps']} p {c['p']} delta {c['delta']} lambda {c['lam']} (the fork's trainer), vanilla head"
    return loss_rows(label, fork_loss(z_fork, y), cll_loss_of(cll_cfg, model, z, y), pairs, z_fork, z)


def small_batch(n: int = 8, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=gen, dtype=F64), torch.randint(0, 10, (n,), generator=gen)


# ---------------------------------------------------------------- (b) SLL
SLL_WIDTH = 0.1  # SLL-S (depth 20, depth_linear 7, 45 channels, 2048 inner features) at width 0.1
SLL_CLL = dict(eps=1.0, p=3e-3, delta=1.0, lam=1e-5)  # sll/train_cifar100_cll.sh
SLL_MEAN = (0.4913, 0.4821, 0.4465)  # the fork's CIFAR-10 reader (shift_data), std 1


@torch.no_grad()
def map_sll(fork: nn.Module, ours: nn.Module, prefix: str = "") -> list[Pair]:
    """kernel/weights -> weight, bias -> bias, q -> q (both weight by |q|)."""
    weight = fork.kernel if hasattr(fork, "kernel") else fork.weights
    ours.weight.copy_(weight)
    ours.bias.copy_(fork.bias)
    ours.q.copy_(fork.q)
    return [
        Pair(prefix + "weight", weight, ours.weight),
        Pair(prefix + "bias", fork.bias, ours.bias),
        Pair(prefix + "q", fork.q, ours.q),
    ]


def sll(args) -> None:
    root = args.ref / "sll"
    out("## (b) SLL: the fork sll/ against cll (float64)")
    out()
    with imported_from(root, STUBS), forks_on_cpu(F64):
        from core import trainer as fork_trainer
        from core.models.layers import SDPBasedLipschitzConvLayer, SDPBasedLipschitzLinearLayer
        from core.models.model import LipschitzNetwork, NormalizedModel
        from core.utils import LossXent

        torch.manual_seed(0)
        rows = []
        x = torch.randn(4, 12, 16, 16, dtype=F64)
        fork = SDPBasedLipschitzConvLayer(None, (1, 12, 16, 16), 12, 5).double()
        ours = L.SLLConv(12, 5).double()
        pairs = map_sll(fork, ours)
        rows.append(layer_rows("conv 12 -> 5 inner, 16x16", fork, ours, pairs, x))
        fork.eval(), ours.eval()
        rows.append(layer_rows("conv, eval mode (cll: 1/t cached)", fork, ours, pairs, x))
        x = torch.randn(4, 96, dtype=F64)
        fork = SDPBasedLipschitzLinearLayer(None, 96, 40).double()
        ours = L.SLLLinear(96, 40).double()
        pairs = map_sll(fork, ours)
        rows.append(layer_rows("dense 96 -> 40 inner, as is", fork, ours, pairs, x))
        fork.epsilon = 0.0
        rows.append(layer_rows("dense, the fork's epsilon 1e-6 set to 0", fork, ours, pairs, x))
        table(LAYER_HEADER, rows)

        depth, depth_linear, channels = cll.models.peers.FAMILY_SIZES["S"]
        c = SLL_CLL
        cll_cfg = cll_recipe("SLL-S", c)
        offset_cfg = run_config(arch="SLL-S", loss="sll_offset_ce", lip_penalty=0.0)  # the SLL recipe

        def models(last_layer: str, cfg: cll.config.RunConfig):
            """The fork's SLL-S (``last_layer`` as its --last_layer) and cll's with the head a run of
            ``cfg`` builds (head auto: the loss's own), mapped: (config, net, fork model, model, pairs)."""
            config = argparse.Namespace(
                depth=depth,
                num_channels=cll.models.scaled(channels, SLL_WIDTH),
                depth_linear=depth_linear,
                n_features=cll.models.scaled(cll.models.peers.INNER_DENSE, SLL_WIDTH),
                conv_size=5,
                dataset="cifar10",
                unconstrained_layer_Ks=False,
                mlp=False,
                liplin=False,
                last_layer=last_layer,
                offset=2**0.5 * 3 / 2,
                temperature=0.25,
            )
            with quiet():
                net = LipschitzNetwork(config, 10)
                fork_model = NormalizedModel(net, SLL_MEAN, (1.0, 1.0, 1.0)).double()
            head = auto_head(cfg)
            model = cll.models.create("SLL-S", 10, (3, 32, 32), width=SLL_WIDTH, head=head, mean=SLL_MEAN).double()
            convs = [m for m in model.body if isinstance(m, L.SLLConv)]
            dense = [m for m in model.body if isinstance(m, L.SLLLinear)]
            pairs = model_pairs(net.conv_layers, convs, map_sll) + model_pairs(net.linear_layers, dense, map_sll)
            if head != "trunc":  # (the truncation heads have no parameters)
                pairs += map_linear(net.last_last, model.head)
            return config, net, fork_model, model, pairs

        x, y = small_batch()

        def whole_model(heads: str, net, fork_model, model, pairs) -> list:
            """Rows of the whole model as is, with the fork's dense epsilon at 0 (cll has none), and so in
            eval mode; both models are left in training mode."""
            rows = [layer_rows(f"whole model, {heads}, as is", fork_model, model, pairs, x)]
            for layer in net.linear_layers:
                layer.epsilon = 0.0
            rows.append(layer_rows(f"whole model, {heads}, dense epsilon 0", fork_model, model, pairs, x))
            fork_model.eval(), model.eval()
            rows.append(layer_rows(f"whole model, {heads}, dense epsilon 0, eval mode", fork_model, model, pairs, x))
            fork_model.train(), model.train()
            return rows

        config, net, fork_model, model, pairs = models("vanilla", cll_cfg)
        n_params = sum(p.numel() for p in model.parameters())
        out(
            f"SLL-S at width {SLL_WIDTH}: {depth} convs of {config.num_channels} channels (5 inner), "
            f"{depth_linear} dense of {config.num_channels * 64} features ({config.n_features} inner); "
            f"{n_params} parameters with a vanilla head, mean {SLL_MEAN}, batch 8 of random images. Heads: "
            "vanilla (the fork's CLL script, --last_layer vanilla; cll's head for loss cll) and truncation "
            "(the fork's default pooling_linear; cll's head for sll_offset_ce)"
        )
        rows = whole_model("vanilla head", net, fork_model, model, pairs)
        with quiet():
            fork_loss = fork_trainer.CLL(c["eps"], c["p"], c["delta"], False, net, 1.0, detach_K=True, lambda_=c["lam"])
        losses = [cll_loss_row(c, fork_loss, cll_cfg, fork_model, model, pairs, x, y)]

        config, net, fork_model, model, pairs = models("pooling_linear", offset_cfg)
        rows += whole_model("truncation heads", net, fork_model, model, pairs)
        table(LAYER_HEADER, rows)
        z_fork, z = fork_model(x), model(x)
        losses.append(
            loss_rows(
                "offset CE (the fork's LossXent; cll sll_offset_ce), truncation heads",
                LossXent(config)(z_fork, y),
                cll_loss_of(offset_cfg, model, z, y),
                pairs,
                z_fork,
                z,
            )
        )
        out("Losses and the gradients of every parameter, each with its run's head (dense epsilon 0):")
        table(LOSS_HEADER, losses)
    known(
        followed=[
            "q: both weight by |q|, q initialised N(0, 1) (conv) and U(0, 1) (dense); mapped q -> q, "
            "gradients compared directly.",
            "heads: the fork's default last layer 'pooling_linear' (the first 10 features) is cll's "
            "truncation head (sll_offset_ce's head auto); its CLL script's 'vanilla' is cll's linear head "
            "(cll's head auto for loss cll).",
        ],
        lines=[
            "the fork's dense layer divides by |q_i| + 1e-6 (its epsilon), cll and the fork's conv layer by "
            "|q_i|: relative differences ~1e-6 / q (rows 'as is' and 'epsilon 0'). Not in the issue's list.",
            "input shift: the fork's CIFAR-10 mean is (0.4913, 0.4821, 0.4465), cll's (0.4914, 0.4822, 0.4465) "
            "(passed here as cll's mean). Not in the issue's list.",
            "the fork's CIFAR-100 CLL script (sll/train_cifar100_cll.sh) passes --clip_p/--clip_eps/--clip_delta, "
            "which sll/main.py does not define (it defines --cll_p, --cll_eps, --cll_delta): argparse stops it "
            "as written.",
        ],
    )


# ---------------------------------------------------------------- (b) CPL
CPL_WIDTH = 0.1  # CPL-S (depth 20, depth_linear 7, 45 channels, 2048 inner features) at width 0.1
CPL_CLL = dict(eps=0.25, p=0.1, delta=0.25, lam=1e-3)  # cpl/train_cll_on_cifar10.sh
CPL_MEAN = (0.4913997551666284, 0.48215855929893703, 0.4465309133731618)  # cpl/trainer.py, std 1


@torch.no_grad()
def map_cpl(fork: nn.Module, ours: nn.Module, prefix: str = "") -> list[Pair]:
    """kernel/weights -> weight, bias -> bias, the power iterate pm.u -> u (the same shape)."""
    weight = fork.kernel if hasattr(fork, "kernel") else fork.weights
    ours.weight.copy_(weight)
    ours.bias.copy_(fork.bias)
    ours.u = fork.pm.u.detach().clone().reshape(ours.u.shape)
    return [Pair(prefix + "weight", weight, ours.weight), Pair(prefix + "bias", fork.bias, ours.bias)]


@torch.no_grad()
def converge_cpl(fork: nn.Module, iters: int = 3000) -> None:
    """The fork's own power iteration run ``iters`` times (its iterate then holds the top singular vector)."""
    fork.pm(fork.kernel if hasattr(fork, "kernel") else fork.weights, iters)


def _compute_dense_on_copy(self, M, max_iter):
    """The CPL fork's ``SpectralNormPowerMethod._compute_dense`` with v = W u formed from a copy of
    the iterate. The fork's own then rewrites ``self.u.data`` with u_1, and autograd, which saved
    that very tensor for the gradient of W u with respect to W, uses u_1 there in place of u_0: its
    gradient is not that of its sigma = <W u_1, v_0> unless u_1 = u_0 (a converged iterate). The
    conv form is not affected (it saves the padded copy F.pad(u))."""
    for _ in range(max_iter):
        v = self.normalize(F.linear(self.u.clone(), M))
        self.u.data = self.normalize(F.linear(v, M.T))
    return torch.mul(F.linear(self.u, M), v).sum()


@contextlib.contextmanager
def dense_iterate_copied(fork_layers):
    """While it runs, the fork's dense power iteration forms W u from a copy of u
    (``_compute_dense_on_copy``, a diagnostic patch of the fork's class)."""
    cls = type(fork_layers[0].pm)
    saved = cls._compute_dense
    cls._compute_dense = _compute_dense_on_copy
    try:
        yield
    finally:
        cls._compute_dense = saved


def cpl_rows(label: str, fork: nn.Module, ours: nn.Module, layers, heads, x: torch.Tensor) -> list[list]:
    """Train mode from the same random iterates (both: sigma <W u_1, v_0>), as is and with the fork's
    dense iterate copied (``dense_iterate_copied``), again from the same converged iterates, and eval
    mode (the fork: 100 further iterations; cll: its sound bound). ``layers``: (the fork's CPL
    layers, cll's), ``heads``: (the fork's, cll's) or None (no parameters)."""

    def mapped() -> list[Pair]:
        return model_pairs(*layers, map_cpl) + (map_linear(*heads) if heads else [])

    rows = [layer_rows(f"{label}, train, same random iterate", fork, ours, mapped(), x)]
    with dense_iterate_copied(layers[0]):
        rows.append(layer_rows(f"{label}, train, same iterate, fork's W u on a copy of u", fork, ours, mapped(), x))
    for f in layers[0]:
        converge_cpl(f)
    pairs = mapped()
    rows.append(layer_rows(f"{label}, train, same converged iterate", fork, ours, pairs, x))
    fork.eval(), ours.eval()
    rows.append(layer_rows(f"{label}, eval (fork 100 iterations, cll sound bound)", fork, ours, pairs, x))
    fork.train(), ours.train()
    return rows


def cpl(args) -> None:
    root = args.ref / "cpl"
    out("## (b) CPL: the fork cpl/ against cll (float64)")
    out()
    with imported_from(root, STUBS, replace=("data",)), forks_on_cpu(F64):
        import trainer as fork_trainer
        import util as fork_util
        from layers import ConvexPotentialLayerConv, ConvexPotentialLayerLinear
        from model import ConvexPotentialLayerNetwork, NormalizedModel

        torch.manual_seed(0)
        fork = ConvexPotentialLayerConv((1, 12, 32, 32), 12, 5).double()
        ours = L.CPLConv(12, 5, (32, 32)).double()
        rows = cpl_rows(
            "conv 12 -> 5 inner, 32x32", fork, ours, ([fork], [ours]), None, torch.randn(4, 12, 32, 32, dtype=F64)
        )
        fork.eval(), ours.eval()
        sigmas = [f"conv: fork {fork.eval_sv_max.item():.10g}, cll {ours.norm_bound():.10g}"]
        fork = ConvexPotentialLayerLinear(96, 40).double()
        ours = L.CPLLinear(96, 40).double()
        rows += cpl_rows("dense 96 -> 40 inner", fork, ours, ([fork], [ours]), None, torch.randn(4, 96, dtype=F64))
        fork.eval(), ours.eval()
        sigmas.append(f"dense: fork {fork.eval_sv_max.item():.10g}, cll {ours.norm_bound():.10g}")
        table(LAYER_HEADER, rows)
        out("||W|| in eval mode, " + "; ".join(sigmas))
        out()

        depth, depth_linear, channels = cll.models.peers.FAMILY_SIZES["S"]
        width, features = (
            cll.models.scaled(channels, CPL_WIDTH),
            cll.models.scaled(cll.models.peers.INNER_DENSE, CPL_WIDTH),
        )
        c = CPL_CLL
        cll_cfg = cll_recipe("CPL-S", c)
        hinge_cfg = run_config(arch="CPL-S", loss="cpl_hinge", lip_penalty=0.0)  # the CPL recipe

        def models(cfg: cll.config.RunConfig):
            """The fork's CPL-S as its trainer builds it for ``cfg``'s loss (no --lln: a vanilla head for
            CLL, the truncation head for the hinge loss) and cll's with the head a run of ``cfg``
            builds: (net, fork model, model, layers, heads or None)."""
            with quiet():
                net = ConvexPotentialLayerNetwork(
                    depth, 10, depth_linear, 5, width, features, use_lln=False, use_vanilla_linear=cfg.loss == "cll"
                )
                fork_model = NormalizedModel(net, CPL_MEAN, (1.0, 1.0, 1.0)).double()
            head = auto_head(cfg)
            model = cll.models.create("CPL-S", 10, (3, 32, 32), width=CPL_WIDTH, head=head, mean=CPL_MEAN).double()
            layers = (
                [m for m in net.modules() if isinstance(m, (ConvexPotentialLayerConv, ConvexPotentialLayerLinear))],
                [m for m in model.body if isinstance(m, (L.CPLConv, L.CPLLinear))],
            )
            return net, fork_model, model, layers, None if head == "trunc" else (net.last_last, model.head)

        x, y = small_batch()
        net, fork_model, model, layers, heads = models(cll_cfg)
        n_params = sum(p.numel() for p in model.parameters())
        out(
            f"CPL-S at width {CPL_WIDTH}: {depth} convs of {width} channels (5 inner), {depth_linear} dense of "
            f"{width * 64} features ({features} inner); {n_params} parameters with a vanilla head, mean "
            f"{tuple(round(m, 4) for m in CPL_MEAN)}, batch 8 of random images. Heads: vanilla (the fork's "
            "CLL runs; cll's head for loss cll) and truncation (the fork's default, PoolingLinear 'trunc'; "
            "cll's head for cpl_hinge)"
        )
        rows = cpl_rows("whole model, vanilla head", fork_model, model, layers, heads, x)
        pairs = model_pairs(*layers, map_cpl) + map_linear(*heads)  # the same iterates again
        with quiet():
            fork_loss = fork_trainer.CLL(
                c["eps"], (c["p"], c["p"], 1.0), c["delta"], False, net, 1.0, detach_K=True, lambda_=c["lam"]
            )
        losses = [cll_loss_row(c, fork_loss, cll_cfg, fork_model, model, pairs, x, y)]

        net, fork_model, model, layers, heads = models(hinge_cfg)
        rows += cpl_rows("whole model, truncation heads", fork_model, model, layers, heads, x)
        table(LAYER_HEADER, rows)
        pairs = model_pairs(*layers, map_cpl)
        z_fork, z = fork_model(x), model(x)
        losses.append(
            loss_rows(
                "hinge, margin 0.7 (the fork's margin_loss; cll cpl_hinge), truncation heads",
                fork_util.margin_loss(z_fork, y, 0.7),
                cll_loss_of(hinge_cfg, model, z, y),
                pairs,
                z_fork,
                z,
            )
        )
        out("Losses and the gradients of every parameter, each with its run's head (train mode, the same iterates):")
        table(LOSS_HEADER, losses)
    known(
        followed=[
            "training sigma: both take <W u_1, v_0> (v_0 = W u_0 / |W u_0| with its gradient, u_1 = W^T v_0 "
            "normalised without), gradient through both factors: the rows 'same random iterate' (outputs, "
            "and the conv layers' gradients; for the dense layers' gradients see below).",
            "heads: the fork's default (no --lln) PoolingLinear 'trunc' (the first 10 features) is cll's "
            "truncation head (cpl_hinge's head auto); its CLL runs' vanilla linear head is cll's linear head "
            "(head auto for loss cll).",
        ],
        lines=[
            "dense layers' training gradient: the fork's SpectralNormPowerMethod._compute_dense (cpl/util.py) "
            "forms v = W u from its Parameter u and then rewrites u.data with u_1; autograd saved that tensor "
            "for W u's gradient, so the fork's backward uses u_1 in place of u_0 there: not the gradient of "
            "its own sigma <W u_1, v_0>, which cll's is. Rows 'same random iterate' (outputs equal, the "
            "dense weights' gradients not) and 'fork's W u on a copy of u' (the fork's method patched so, a "
            "diagnostic: float64 rounding); the same at a converged iterate (u_1 = u_0). Its conv form "
            "saves the padded copy F.pad(u) and is not affected. Not in the issue's list.",
            "evaluation: the fork's h uses 100 power iterations from the current iterate (an estimate from "
            "below: h may exceed 2/||W||^2), cll's a sound upper bound on ||W|| (conv: the circular "
            "convolution's FFT bound; dense: the exact norm), so cll's evaluation step is slightly shorter. "
            "Not in the issue's list.",
            "the fork hard-codes 32x32 inputs (its power iterates and its dense input size C*8*8); its dense "
            "layer holds an unused parameter alpha; its CIFAR-10 mean has more digits than cll's "
            "(0.4914, 0.4822, 0.4465); passed here as cll's mean.",
        ],
    )


# ---------------------------------------------------------------- (b) SOC
SOC_WIDTH = 0.25  # LipConv-5 (one SOC conv + HH1 per stage) with 32 * 0.25 = 8 initial channels
SOC_CLL = dict(eps=0.25, p=0.05, delta=0.25, lam=1e-3)  # soc/train_cll_on_cifar10.sh
SOC_MEAN, SOC_STD = (0.4914, 0.4822, 0.4465), 0.2507  # soc/utils.py (its data loader normalises)


class Standardise(nn.Module):
    """(x - mean) / std, what the SOC fork's data loader does before its model sees an image."""

    def __init__(self, mean, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=F64).view(1, -1, 1, 1))
        self.std = std

    def forward(self, x):
        return (x - self.mean) / self.std


@torch.no_grad()
def map_soc(fork: nn.Module, ours: nn.Module, prefix: str = "") -> list[Pair]:
    """random_conv_filter -> weight, bias -> bias; of the k-th reshape the fork keeps the vector over
    its rows (outputs) as v_k and over its columns as u_k (the 4th the other way round), cll as
    u_{k-1} and v_{k-1}; the training-forward counter total_iters -> steps (so that both take the
    same number of power iterations next); the evaluation series gets the fork's 12 terms (cll's
    default: 15)."""
    ours.weight.copy_(fork.random_conv_filter)
    ours.bias.copy_(fork.bias)
    rows_cols = [(fork.v1, fork.u1), (fork.v2, fork.u2), (fork.v3, fork.u3), (fork.u4, fork.v4)]
    for k, (rows, cols) in enumerate(rows_cols):
        setattr(ours, f"u{k}", rows.detach().flatten().clone())
        setattr(ours, f"v{k}", cols.detach().flatten().clone())
    ours.steps.fill_(fork.total_iters)
    ours.eval_terms = fork.eval_terms
    ours.clear_cache()
    return [Pair(prefix + "weight", fork.random_conv_filter, ours.weight), Pair(prefix + "bias", fork.bias, ours.bias)]


@torch.no_grad()
def as_cll_builds(ours: nn.Module) -> None:
    """Give ``ours`` the singular vectors cll's constructor computes for its present kernel: random
    unit vectors, then ``INIT_ITERS`` (50) power iterations on that kernel."""
    for name, vector in list(ours.named_buffers()):
        if name[0] in "uv":
            setattr(ours, name, F.normalize(torch.randn_like(vector), dim=0))
    ours._power_step(SOC_INIT_ITERS)
    ours.clear_cache()


@torch.no_grad()
def map_hh1(fork: nn.Module, ours: nn.Module, prefix: str = "") -> list[Pair]:
    """theta -> theta: both keep the pair where a sin(theta/2) - b cos(theta/2) <= 0 and reflect it
    elsewhere (the fork's theta has the shape (1, C/2, 1, 1), cll's (C/2,))."""
    ours.theta.copy_(fork.theta.flatten())
    return [Pair(prefix + "theta", fork.theta, ours.theta, lambda grad, theta: grad.flatten())]


@torch.no_grad()
def soc_vector_differences(fork: nn.Module, ours: nn.Module) -> list[float]:
    """Per reshape, the larger relative difference of the row and the column vector (fork vs cll)."""
    rows_cols = [(fork.v1, fork.u1), (fork.v2, fork.u2), (fork.v3, fork.u3), (fork.u4, fork.v4)]
    return [
        max(rel(r.flatten(), getattr(ours, f"u{k}")), rel(c.flatten(), getattr(ours, f"v{k}")))
        for k, (r, c) in enumerate(rows_cols)
    ]


def soc_sigma(fork: nn.Module) -> float:
    """The fork's sigma_hat from its stored vectors (no update)."""
    saved = fork.training
    fork.eval()
    with torch.no_grad():
        sigma = fork.update_sigma().item()
    fork.train(saved)
    return sigma


@torch.no_grad()
def cll_sigma(ours: nn.Module) -> float:
    """cll's sigma_hat from its stored vectors: the smallest of the four reshapes' u^T M v."""
    reshapes = four_reshapes(ours.skew())
    return min(float(getattr(ours, f"u{n}") @ m @ getattr(ours, f"v{n}")) for n, m in enumerate(reshapes))


def converge_soc(fork: nn.Module, iters: int = 2000) -> None:
    """The fork's own update of its singular vectors, ``iters`` iterations (its schedule's long step)."""
    saved = fork.init_iters, fork.total_iters, fork.training
    fork.init_iters, fork.total_iters = iters, 0
    fork.train()
    fork.update_sigma()
    fork.init_iters, fork.total_iters = saved[:2]
    fork.train(saved[2])


def soc(args) -> None:
    root = args.ref / "soc"
    out("## (b) SOC: the fork soc/ against cll (float64)")
    out()
    with imported_from(root, (*STUBS, "einops")), forks_on_cpu(F64):
        import train_robust as fork_train
        from custom_activations import HouseHolder
        from lip_convnets import LipConvNet
        from skew_ortho_conv import SOC

        torch.manual_seed(0)
        x = torch.randn(4, 8, 16, 16, dtype=F64)
        with quiet():
            fork = SOC(8, 16, 3, stride=2).double()
        ours = L.SOC(8, 16, 3, stride=2).double()
        rows = []
        pairs = map_soc(fork, ours)
        as_cll_builds(ours)
        built = soc_sigma(fork), cll_sigma(ours)
        fork.eval(), ours.eval()
        label = "SOC 8 -> 16, stride 2, eval, as built (each side's own vectors), 12 terms"
        rows.append(layer_rows(label, fork, ours, pairs, x))
        fork.train(), ours.train()
        pairs = map_soc(fork, ours)  # the fork's vectors as built, both counters at 0
        rows.append(layer_rows("SOC, train, first step, same vectors (50 iterations each)", fork, ours, pairs, x))
        first = soc_vector_differences(fork, ours)
        after_first = soc_sigma(fork), cll_sigma(ours)
        pairs = map_soc(fork, ours)
        rows.append(layer_rows("SOC, train, second step, same vectors (1 iteration each)", fork, ours, pairs, x))
        second = soc_vector_differences(fork, ours)
        converge_soc(fork)
        for label, terms in [("SOC, eval, converged, 12 terms (mapped)", 12), ("SOC, eval, cll's 15 terms", 15)]:
            pairs = map_soc(fork, ours)
            ours.eval_terms = terms
            fork.eval(), ours.eval()
            rows.append(layer_rows(label, fork, ours, pairs, x))
            fork.train(), ours.train()
        x = torch.randn(4, 16, 8, 8, dtype=F64)
        fork, ours = HouseHolder(16).double(), L.HouseHolder(16).double()
        unmapped = [Pair("theta", fork.theta, ours.theta, lambda grad, theta: grad.flatten())]
        rows.append(layer_rows("HH1 16, both at their init theta = pi/2 (not mapped)", fork, ours, unmapped, x))
        with torch.no_grad():
            fork.theta.uniform_(0, 2 * math.pi)
        pairs = map_hh1(fork, ours)
        rows.append(layer_rows("HH1, random theta, copied", fork, ours, pairs, x))
        table(LAYER_HEADER, rows)
        out(
            f"sigma_hat (the smallest of the four reshapes' estimates) as built: the fork {built[0]:.6g} (its "
            f"vectors belong to the kernel that reset_parameters() then redraws), cll {built[1]:.6g} (its own "
            f"kernel); after the first training step from the fork's vectors: fork {after_first[0]:.6g}, "
            f"cll {after_first[1]:.6g}"
        )
        out(
            "Relative difference of the fork's and cll's singular vectors per reshape (1..4) after the first "
            "training step (50 iterations): "
            + ", ".join(f"{d:.1e}" for d in first)
            + "; after the second (1 iteration): "
            + ", ".join(f"{d:.1e}" for d in second)
        )
        out()

        init = cll.models.scaled(32, SOC_WIDTH)
        c, gamma = SOC_CLL, 0.1
        cr_cfg = run_config(arch="LipConv-5", loss="soc_cr", cr_gamma=gamma, lip_penalty=0.0)

        def models(lln: bool, head: str):
            """The fork's LipConv-5 (HH1; ``lln``: an LLN head, else vanilla) and cll's with ``head``:
            (net, fork model, model, cll's SOC layers, mapped), ``mapped()`` copying the fork's weights,
            vectors, counters, thetas and head into cll's anew."""
            with quiet():
                net = LipConvNet("soc", "hh1", init_channels=init, block_size=1, num_classes=10, lln=lln, soc_fc=False)
                net = net.double()
            # cll's Normalize divides by the float32 value of 0.2507 (cll.layers.Normalize); so does this one
            model = cll.models.create("LipConv-5", 10, (3, 32, 32), width=SOC_WIDTH, head=head, mean=SOC_MEAN).double()
            fork_model = nn.Sequential(Standardise(SOC_MEAN, model.body[0].std), net)
            stages = net.layer1, net.layer2, net.layer3, net.layer4, net.layer5
            blocks = [block for stage in stages for block in stage]
            socs = [m for m in model.body if isinstance(m, L.SOC)]
            hhs = [m for m in model.body if isinstance(m, L.HouseHolder)]

            def mapped() -> list[Pair]:
                return (
                    model_pairs([b.conv for b in blocks], socs, map_soc)
                    + model_pairs([b.activation for b in blocks], hhs, map_hh1)
                    + map_linear(net.last_layer, model.head)
                )

            return net, fork_model, model, socs, mapped

        net, fork_model, model, socs, mapped = models(lln=False, head="linear")  # (cll's head auto for loss cll)
        n_params = sum(p.numel() for p in model.parameters())
        out(
            f"LipConv-5 at width {SOC_WIDTH} ({init} initial channels, HH1), {n_params} parameters with a "
            f"vanilla head (the fork's CLL runs; cll's head for loss cll), (x - mean) / {SOC_STD}, batch 8 of "
            "random images; the CR loss below with LLN heads on both sides (the fork's --lln, cll's head for "
            "soc_cr)"
        )
        x, y = small_batch()
        rows = [
            layer_rows(
                "whole model, train, first step from the fork's vectors as built (50 iterations each)",
                fork_model,
                model,
                mapped(),
                x,
            )
        ]
        rows.append(
            layer_rows("whole model, train, second step from the same vectors (1 each)", fork_model, model, mapped(), x)
        )
        pairs = mapped()
        fork_model.eval(), model.eval()
        rows.append(layer_rows("whole model, eval, 12 terms (mapped)", fork_model, model, pairs, x))
        for layer in socs:
            layer.eval_terms = 15
        model.eval()  # drops the cached kernels
        rows.append(layer_rows("whole model, eval, cll's 15 terms", fork_model, model, pairs, x))
        fork_model.train(), model.train()
        table(LAYER_HEADER, rows)

        get_l = lambda: net.L_multiplier.detach().prod().item() * (1.0 / SOC_STD)  # train_robust.py's getL
        schedule = [c["p"], c["p"], 1.0]
        rows = []
        for label, detach, lam in [
            ("as train_robust.py builds it: detach_K and lambda_ not passed", False, 0.0),
            ("with the script's --detach_K --lambda_", True, c["lam"]),
        ]:
            pairs = mapped()  # the same vectors and counters: 1 iteration each
            with quiet():
                fork_loss = fork_train.CLL(
                    c["eps"], schedule, c["delta"], False, model=net, L=get_l, detach_K=detach, lambda_=lam
                )
            cfg = run_config(
                arch="LipConv-5",
                loss="cll",
                eps=c["eps"],
                p=c["p"],
                delta=c["delta"],
                cll_form="pairwise",
                lip_penalty=lam,
                lip_penalty_form="batch",
                cll_head_gradient=not detach,  # the paper grid's SOC + CLL rows: as the fork ran
            )
            z_fork, z = fork_model(x), model(x)
            rows.append(
                loss_rows(
                    f"CLL eps {c['eps']} p {c['p']} lambda {lam}, {label}, vanilla head",
                    fork_loss(z_fork, y),
                    cll_loss_of(cfg, model, z, y),
                    pairs,
                    z_fork,
                    z,
                )
            )
        net, fork_model, model, socs, mapped = models(lln=True, head=auto_head(cr_cfg))
        pairs = mapped()  # the vectors as the fork built them: a first step, 50 iterations each
        z_fork, z = fork_model(x), model(x)
        cert = fork_train.lln_certificates(z_fork, y, net.last_layer, 1.0 / SOC_STD)
        fork_loss = F.cross_entropy(z_fork, y) - gamma * F.relu(cert).mean()
        rows.append(
            loss_rows(
                f"CE - {gamma} ReLU(certificate) (the fork's loop; cll soc_cr), LLN heads",
                fork_loss,
                cll_loss_of(cr_cfg, model, z, y),
                pairs,
                z_fork,
                z,
            )
        )
        out("Losses and the gradients of every parameter, each with its run's head (train mode, the same vectors):")
        table(LOSS_HEADER, rows)
    known(
        followed=[
            "power-iteration schedule: 50 iterations at every 200th training forward (the first included), 1 "
            "otherwise; the counter is mapped (total_iters -> steps): rows 'first step' (50) and 'second step' (1).",
            "the fourth reshape (kernel as (out h w) x in) updates its input-channel vector first, the other "
            "from it: after a step from the same vectors all four reshapes' vectors agree to the fork's "
            "float32 norms (the line 'Relative difference ... singular vectors').",
            "HH1: both keep a pair where a sin(theta/2) - b cos(theta/2) <= 0 ((min, max) at theta = pi/2): "
            "equal at their init without a map, theta copied otherwise.",
            "heads: the fork's CLL runs' vanilla linear head is cll's linear head (head auto for loss cll); its "
            "CR runs' --lln is cll's LLN head (head auto for soc_cr).",
        ],
        lines=[
            "evaluation series: the fork 12 Taylor terms, cll 15 (mapped to 12 except in the rows 'cll's 15 "
            "terms'); training: 5 on both sides.",
            "the fork computes its singular vectors at construction (fantastic_four, 50 iterations) for the "
            "kernel it then redraws in reset_parameters(): until its first training forward (50 iterations) "
            "sigma_hat belongs to another kernel (it can be tiny or negative, the series then diverges; row "
            "'eval, as built'). cll iterates on its own kernel at construction. Not in the issue's list.",
            "the fork normalises its singular vectors by a norm computed in float32 (l2_normalize: tensor.float()), "
            "so in float64 they are unit vectors to ~1e-7 only. Not in the issue's list.",
            "the fork's CLL loss (train_robust.py) is built without detach_K and lambda_: the script's "
            "--detach_K and --lambda_ 1e-3 (soc/train_cll_on_cifar10.sh) never reach it, so its runs train "
            "with K_tj not detached (gradient into the head through the division) and no K penalty; cll's "
            "CLL detaches K_F and W, its recipe sets lip_penalty 1e-5 (batch). Not in the issue's list.",
            "the fork trains in mixed precision (apex amp O2, its default --opt-level) for every data set but "
            "moons; cll in float32. Not in the issue's list.",
            "input scale: cll's Normalize divides by 0.2507 rounded to float32 (0.25069999694...), the fork's "
            "loader by 0.2507: 1.2e-8 relative in float64 (nothing in float32); the fork's side here divides "
            "by cll's value.",
            "heads: the fork's cross-entropy runs without --lln end in a 1x1 SOC conv (soc_fc); not compared.",
        ],
    )


# ---------------------------------------------------------------- main
FAMILIES = {"gloro": gloro, "sll": sll, "cpl": cpl, "soc": soc}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--ref", type=Path, required=True, help="folder holding unconstrained/ (prepared), soc/, cpl/, sll/"
    )
    ap.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    ap.add_argument("--cifar", type=Path, default=None, help="a cifar-10-batches-py folder (default: random images)")
    ap.add_argument("--batch", type=int, default=64, help="batch size of the GloRo comparisons")
    ap.add_argument("--steps", type=int, default=5, help="GloRo training steps")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name, run in FAMILIES.items():
        if args.family in (name, "all"):
            run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
