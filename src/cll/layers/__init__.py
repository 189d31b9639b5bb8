"""Building blocks of Lipschitz networks, one file per idea.

``activations``  MaxMin (GroupSort-2) and the Householder activation HH1
``basic``        zero channel padding, input normalisation, unit-row (LLN) heads
``soc``          skew-orthogonal convolution (Singla & Feizi, ICML 2021)
``cpl``          convex potential layers (Meunier et al., ICML 2022)
``sll``          SDP-based Lipschitz layers (Araujo et al., ICLR 2023)
``sandwich``     Sandwich layers of LBDN (Wang & Manchester, ICML 2023)

No layer here computes a certifying bound: ``cll.lipschitz`` bounds every layer type from its
parameters (and refuses an unknown one), so "1-Lipschitz by construction" is always measured.
"""

from .activations import HouseHolder, MaxMin
from .basic import Normalize, PaddingChannels, unit_row_head
from .cpl import CPLConv, CPLLinear
from .sandwich import SandwichConv, SandwichLinear
from .sll import SLLConv, SLLLinear
from .soc import SOC

__all__ = [
    "SOC",
    "CPLConv",
    "CPLLinear",
    "HouseHolder",
    "MaxMin",
    "Normalize",
    "PaddingChannels",
    "SLLConv",
    "SLLLinear",
    "SandwichConv",
    "SandwichLinear",
    "unit_row_head",
]
