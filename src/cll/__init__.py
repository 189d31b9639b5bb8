"""cll: certified-robust classifiers with Lipschitz margins (the Calibrated Lipschitz-Margin loss).

Losch, Stutz, Schiele, Fritz, "Certified Robust Models with Slack Control and Large Lipschitz
Constants", GCPR 2023, arXiv 2309.06166.

Public API (everything else is reachable through the submodules):
    api                                         cll.api: certify and audit your own model (below)
    create_model(arch, num_classes, in_shape)   cll.models
    lipschitz_constant(model)                   cll.lipschitz: the sound bound used to certify
    certify.certify(model, batches, eps)        cll.certify: the one certifier
    k_hf(eps, p)                                cll.losses
    load_dataset(name, root=...)                cll.data

The library use, documented and tested (``cll.api``, examples/certify_checkpoint.py)::

    from cll import api
    model = api.lipschitz_net(my_layers, in_shape=(3, 32, 32))   # or api.load_run(run_dir)[1]
    api.upper_bound(model); api.certify(model, loader, eps=["36/255"]); api.audit(model, loader)
"""

__all__ = ["api", "certify", "create_model", "k_hf", "lipschitz_constant", "load_dataset"]
__version__ = "0.1.0"

# name -> (submodule, attribute); imported on first use (PEP 562), not at `import cll`: the
# workflow's parse path (`snakemake -n`) imports cll.grid and must not pay for torch
_LAZY = {
    "api": ("api", None),
    "certify": ("certify", None),
    "load_dataset": ("data", "load_dataset"),
    "lipschitz_constant": ("lipschitz", "upper_bound"),
    "k_hf": ("losses", "k_hf"),
    "create_model": ("models", "create"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cll' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = importlib.import_module(f".{module}", __name__)
    return value if attr is None else getattr(value, attr)
