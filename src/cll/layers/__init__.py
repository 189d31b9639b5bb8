"""Building blocks of Lipschitz networks, one file per idea.

``activations``  MaxMin (GroupSort-2, adjacent or half pairs) and the Householder activation HH1
``clipped``      clipped ReLU and clipped MaxMin with learnable thresholds (Local-Lip-B)
``basic``        zero channel padding, input normalisation, unit-row (LLN) heads
``soc``          skew-orthogonal convolution (Singla & Feizi, ICML 2021)
``cpl``          convex potential layers (Meunier et al., ICML 2022)
``sll``          SDP-based Lipschitz layers (Araujo et al., ICLR 2023)
``sandwich``     Sandwich layers of LBDN (Wang & Manchester, ICML 2023)
``liresnet``     LiResNet's linear residual block and Cholesky-orthogonalised layers (Hu et al.,
                 NeurIPS 2023, ICLR 2024)
``bro``          BRONet's block reflector orthogonal layers: the conv per frequency, dense, neck (Lai
                 et al., ICML 2025)

Every layer bounds itself next to its forward (``upper_bound(in_shape)``, ``rounding(in_shape,
dtype)``, ``forward64`` where it derives tensors from its parameters): a bound computed from the
layer's actual parameters, never "1-Lipschitz by construction" taken on trust. ``cll.lipschitz``
multiplies them (torch's own layer types have a table there) and refuses an unknown layer type.
"""

from ..registry import Registry
from .activations import HouseHolder, MaxMin, MaxMinHalves
from .basic import Normalize, PaddingChannels, truncation_head, unit_row_head
from .bro import BROConv, BROLinear, BROPatchConv, BROResidualLinear
from .clipped import ClippedMaxMin, ClippedReLU
from .cpl import CPLConv, CPLLinear
from .liresnet import CholeskyLinear, CholeskyPatchConv, CholeskyResidualLinear, LiResBlock
from .sandwich import SandwichConv, SandwichLinear
from .sll import SLLConv, SLLLinear
from .soc import SOC

__all__ = [
    "ACTIVATIONS",
    "SOC",
    "BROConv",
    "BROLinear",
    "BROPatchConv",
    "BROResidualLinear",
    "CPLConv",
    "CPLLinear",
    "CholeskyLinear",
    "CholeskyPatchConv",
    "CholeskyResidualLinear",
    "ClippedMaxMin",
    "ClippedReLU",
    "HouseHolder",
    "LiResBlock",
    "MaxMin",
    "MaxMinHalves",
    "Normalize",
    "PaddingChannels",
    "SLLConv",
    "SLLLinear",
    "SandwichConv",
    "SandwichLinear",
    "truncation_head",
    "unit_row_head",
]

# The activations a GloRo-family net can use (run-config key ``activation``), by name: each
# builder takes (feature shape without the batch axis, clip_init: the initial threshold).
ACTIVATIONS = Registry("activation")
ACTIVATIONS.register("maxmin")(lambda shape, clip_init: MaxMin())
ACTIVATIONS.register("clipped_maxmin")(ClippedMaxMin)
ACTIVATIONS.register("clipped_relu")(ClippedReLU)
