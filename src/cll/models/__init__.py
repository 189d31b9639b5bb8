"""Architectures, built by name: ``create("8C2F", num_classes=200, in_shape=(3, 64, 64))``.

Every model is a ``LipschitzNet``: a sequential ``body`` of layers that ``cll.lipschitz`` bounds one by one (an input
normalisation (x - mean) / std first, where the family uses one), a linear ``head`` (the
classifier: unconstrained, or with unit-norm rows, "LLN"), and a ``power`` module holding the
persistent power-iteration iterates of the body's plain conv/linear layers. The normalisation is
the body's first layer (factor 1/std, ``input_lipschitz``); GloRo-family nets see raw [0,1]
pixels, as in the reference.
The peers' families (SOC LipConvNets, CPL, SLL, Sandwich) are in ``cll.models.peers``.

GloRo-family nets, as the CLL reference configures them (docs/recipes.md; Leino, Wang,
Fredrikson, "Globally-Robust Neural Networks", ICML 2021, arXiv 2102.08452). ``C(out, k, s, p)``
is a conv with bias followed by MaxMin; ``F(n)`` a dense layer followed by MaxMin; the head is the
last dense layer. Sizes of the dense layers after Flatten follow from ``in_shape``.

======== ======================================================================================
2C2F     C(16,4,2,1) C(32,4,2,1) F(100)                                   (GloRo's MNIST net)
4C3F     C(32,3,1,1) C(32,3,2,1) C(64,3,1,1) C(64,3,2,1) F(512) F(512)
6C2F     C(32,3,1,1) C(32,3,1,1) C(32,4,2,1) C(64,3,1,1) C(64,3,1,1) C(64,4,2,1) F(512)
8C2F     C(64,3,1,1) C(64,3,1,1) C(64,4,2,0) C(128,3,1,1) C(128,3,1,1) C(128,4,2,0)
         C(256,3,1,1) C(256,4,2,0) F(256)
moons-mlp  F(10) F(20) F(40) F(40) F(20) F(10)  on 2-d inputs
======== ======================================================================================

The activation is MaxMin unless the run asks for another registered one (``activation``:
``clipped_maxmin`` or ``clipped_relu``, the clipped layers of Local-Lip-B, with thresholds
initialised to ``clip_init``: one value, or one per activation layer). ``8C2F`` is the same
network whatever the activation.

Initialisation: Kaiming-normal weights, zero biases (the reference's ``init_weights``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import ACTIVATIONS, Normalize, unit_row_head
from ..lipschitz import PowerIteration
from ..registry import Registry

ARCHS = Registry("architecture")
GLORO_FAMILY = ("2C2F", "4C3F", "6C2F", "8C2F", "moons-mlp")  # the archs built by gloro_net


class LipschitzNet(nn.Module):
    """body -> head; the body's Lipschitz constant is bounded layer by layer in ``cll.lipschitz``."""

    def __init__(
        self,
        body: nn.Sequential,
        head: nn.Linear,
        in_shape: Sequence[int],
        mean: Sequence[float] | None = None,
        std: float = 1.0,
    ):
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.num_classes = head.out_features
        if mean is not None:  # the normalisation is the body's first layer, bounded like any other
            body = nn.Sequential(Normalize(mean, std), *body)
        self.body = body
        self.head = head
        self.power = PowerIteration(body, self.in_shape)

    @property
    def input_lipschitz(self) -> float:
        """The factor of the body's parameter-free layers that power iteration does not see (the
        input normalisation, 1/std): training estimates of K_F multiply by it."""
        return math.prod(m.lipschitz for m in self.body if isinstance(m, Normalize))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def scaled(n: int, width: float) -> int:
    """A layer size n * width, kept even (MaxMin and HH1 pair channels); n itself at width 1."""
    return n if width == 1 else max(2, 2 * round(n * width / 2))


def make_head(kind: str, in_features: int, num_classes: int) -> nn.Linear:
    """``linear`` (unconstrained, the certifier uses its pairwise row distances) or ``lln``."""
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "lln":
        return unit_row_head(in_features, num_classes)
    raise ValueError(f"unknown head {kind!r}; allowed: linear, lln")


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        params = getattr(module, "parametrizations", None)  # an LLN head: initialise the free W
        nn.init.kaiming_normal_(params.weight.original if params is not None else module.weight)
        nn.init.zeros_(module.bias)


def gloro_net(
    convs: Sequence[tuple[int, int, int, int]],
    dense: Sequence[int],
    num_classes: int,
    in_shape: Sequence[int],
    head: str = "linear",
    mean: Sequence[float] | None = None,
    width: float = 1.0,
    activation: str = "maxmin",
    clip_init: float | Sequence[float] = 1.0,
) -> LipschitzNet:
    """Conv layers ``(out_channels, kernel, stride, padding)``, then dense widths, then the head;
    the activation after every layer but the head; ``width`` scales the channel and dense sizes.
    ``mean`` is accepted and not used: the GloRo family is trained on raw [0,1] inputs, as in the
    reference."""
    n_act = len(convs) + len(dense)
    inits = list(clip_init) if isinstance(clip_init, Sequence) else [clip_init] * n_act
    if len(inits) != n_act:
        raise ConfigError(f"clip_init: {len(inits)} values for the {n_act} activation layers of this architecture")
    layers: list[nn.Module] = []
    convs = [(scaled(out, width), k, s, p) for out, k, s, p in convs]
    dense = [scaled(n, width) for n in dense]
    x = torch.zeros(1, *in_shape)  # traces the feature shapes: activations hold one threshold per neuron

    def add(layer: nn.Module) -> None:  # a conv/dense layer and its activation
        nonlocal x
        with torch.no_grad():
            x = layer(x)
        init = inits[sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in layers)]
        layers.extend([layer, ACTIVATIONS.get(activation)(tuple(x.shape[1:]), init)])

    for out, k, s, p in convs:
        add(nn.Conv2d(x.shape[1], out, k, stride=s, padding=p))
    if len(in_shape) > 1:
        layers.append(nn.Flatten())
        x = x.flatten(1)
    for n in dense:
        add(nn.Linear(x.shape[1], n))
    model = LipschitzNet(nn.Sequential(*layers), make_head(head, x.shape[1], num_classes), in_shape)
    model.apply(_init)
    return model


@ARCHS.register("2C2F")
def gloro_2c2f(num_classes: int, in_shape: Sequence[int], **kw) -> LipschitzNet:
    return gloro_net([(16, 4, 2, 1), (32, 4, 2, 1)], [100], num_classes, in_shape, **kw)


@ARCHS.register("4C3F")
def gloro_4c3f(num_classes: int, in_shape: Sequence[int], **kw) -> LipschitzNet:
    return gloro_net(
        [(32, 3, 1, 1), (32, 3, 2, 1), (64, 3, 1, 1), (64, 3, 2, 1)], [512, 512], num_classes, in_shape, **kw
    )


@ARCHS.register("6C2F")
def gloro_6c2f(num_classes: int, in_shape: Sequence[int], **kw) -> LipschitzNet:
    return gloro_net(
        [(32, 3, 1, 1), (32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 3, 1, 1), (64, 4, 2, 1)],
        [512],
        num_classes,
        in_shape,
        **kw,
    )


@ARCHS.register("8C2F")
def gloro_8c2f(num_classes: int, in_shape: Sequence[int], **kw) -> LipschitzNet:
    return gloro_net(
        [
            (64, 3, 1, 1),
            (64, 3, 1, 1),
            (64, 4, 2, 0),
            (128, 3, 1, 1),
            (128, 3, 1, 1),
            (128, 4, 2, 0),
            (256, 3, 1, 1),
            (256, 4, 2, 0),
        ],
        [256],
        num_classes,
        in_shape,
        **kw,
    )


@ARCHS.register("moons-mlp")
def moons_mlp(num_classes: int, in_shape: Sequence[int], **kw) -> LipschitzNet:
    return gloro_net([], [10, 20, 40, 40, 20, 10], num_classes, in_shape, **kw)


def create(
    arch: str,
    num_classes: int,
    in_shape: Sequence[int],
    head: str = "linear",
    mean: Sequence[float] | None = None,
    width: float = 1.0,
    activation: str = "maxmin",
    clip_init: float | Sequence[float] = 1.0,
) -> LipschitzNet:
    """Build a registered architecture; an unknown name fails with the list of known ones.

    ``head``: ``linear`` or ``lln``; ``mean``: the data set's channel mean, which the peers'
    families subtract (GloRo-family nets ignore it: raw [0,1] inputs, as in the reference);
    ``width``: a factor on every layer width (tests and CPU runs use small ones); ``activation``
    and ``clip_init``: see the module docstring (GloRo-family nets only; the peers' families
    have their own activations)."""
    extra = {}
    if activation != "maxmin":
        ACTIVATIONS.get(activation)  # an unknown name fails with the list of known ones
        if arch not in GLORO_FAMILY:
            raise ConfigError(
                f"activation: {activation!r} applies to the GloRo-family architectures "
                f"({', '.join(GLORO_FAMILY)}); {arch} has its own activations"
            )
        extra = {"activation": activation, "clip_init": clip_init}
    return ARCHS.create(
        arch, num_classes=num_classes, in_shape=tuple(in_shape), head=head, mean=mean, width=width, **extra
    )


def names() -> list[str]:
    return ARCHS.names()


from . import peers  # noqa: E402,F401  (registers the peers' families)
