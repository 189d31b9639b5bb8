"""cll: certified-robust classifiers with Lipschitz margins (the Calibrated Lipschitz-Margin loss).

Losch, Stutz, Schiele, Fritz, "Certified Robust Models with Slack Control and Large Lipschitz
Constants", GCPR 2023, arXiv 2309.06166.

Public API (everything else is reachable through the submodules):
    create_model(arch, num_classes, in_shape)   cll.models
    lipschitz_constant(model)                   cll.lipschitz: the sound bound used to certify
    certify.certify(model, batches, eps)        cll.certify: the one certifier
    k_hf(eps, p)                                cll.losses
    load_dataset(name, root=...)                cll.data
"""
from . import certify
from .data import load_dataset
from .lipschitz import lipschitz_constant
from .losses import k_hf
from .models import create as create_model

__all__ = ["certify", "create_model", "k_hf", "lipschitz_constant", "load_dataset"]
__version__ = "0.1.0"
