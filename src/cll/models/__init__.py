"""Architectures, built by name: ``create("8C2F", num_classes=200, in_shape=(3, 64, 64))``.

Every model is a ``LipschitzNet`` (``cll.models.net``): a sequential ``body`` of layers that
``cll.lipschitz`` bounds one by one (an input normalisation (x - mean) / std first, where the
family uses one), a linear ``head`` (the classifier: unconstrained, or with unit-norm rows, "LLN"),
and a ``power`` module holding the persistent power-iteration iterates of the body's plain
conv/linear layers. The normalisation is the body's first layer (factor 1/std,
``input_lipschitz``); GloRo-family nets see raw [0,1] pixels, as in the reference.

The families register themselves into ``ARCHS`` when their module is imported: the GloRo family
(2C2F, 4C3F, 6C2F, 8C2F, moons-mlp) in ``cll.models.gloro``, the peers' (SOC LipConvNets, CPL,
SLL, Sandwich) in ``cll.models.peers``, LiResNet in ``cll.models.liresnet``, BRONet in
``cll.models.bronet``. A new family is a new module imported here.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import bronet, gloro, liresnet, peers  # noqa: F401  (each registers its family into ARCHS)
from .gloro import GLORO_FAMILY, gloro_net, without_gloro_options
from .net import ARCHS, LipschitzNet, make_head, scaled

__all__ = ["ARCHS", "GLORO_FAMILY", "LipschitzNet", "create", "gloro_net", "make_head", "names", "scaled"]


def create(arch: str, num_classes: int, in_shape: Sequence[int], **options) -> LipschitzNet:
    """Build a registered architecture; an unknown name fails with the list of known ones.

    ``options`` are the builder's keywords, with the builder's defaults: ``head`` (``linear`` or
    ``lln``), ``mean`` (the data set's channel mean, which the peers' families subtract;
    GloRo-family nets ignore it), ``width`` (a factor on every layer width: tests and CPU runs use
    small ones), and for the GloRo family only ``activation`` and ``clip_init`` (``cll.models.gloro``;
    other families have their own activations)."""
    if arch not in GLORO_FAMILY:
        options = without_gloro_options(arch, options)
    return ARCHS.create(arch, num_classes=num_classes, in_shape=tuple(in_shape), **options)


def names() -> list[str]:
    return ARCHS.names()
