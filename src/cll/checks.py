"""What a certificate requires of the model, its input and the environment: that the function the
bounds describe is the one that runs.

The bound K_F and the rounding terms describe the plain layers of ``model.body`` applied in order,
then the plain linear ``model.head``, at ``model.in_shape``, in float32 (the inference pass) and in
float64 (the certifier's own pass), with the weights they were computed from. Anything that makes
``model(x)`` compute another function is refused here, in one line naming the cause, never
certified:

* forward and forward-pre hooks on any module, or registered globally (they may change outputs);
* a head that is not exactly ``nn.Linear`` (a parametrisation of its weight only if it is cll's
  ``UnitRows``), a body that is not exactly ``nn.Sequential``, a forward or ``__call__`` replaced
  on an instance, a layer subclass that overrides ``forward`` below the class that bounds it;
* in-place layers (they overwrite the inputs whose norms the rounding bound reads);
* parameters that are not float32, inputs of another dtype or shape than ``model.in_shape``;
* lower-precision arithmetic switched on from outside: oneDNN's ``ONEDNN_DEFAULT_FPMATH_MODE``
  (read by the library itself, so it cannot be reset from here), and torch dispatch or function
  modes (the one torch pushes for ``with torch.device(...)`` only sets defaults and is allowed).
  Autocast and the precision switches are turned off inside the passes (``passes.full_precision``);
* weights that changed since the certifier was built (``WeightsGuard``: a bitwise copy, so writes
  through ``p.data`` or ``set_`` that leave version counters alone are seen too).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize
from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .errors import CllError
from .layers.basic import UnitRows, same_tensors
from .lipschitz import TORCH_LAYERS

FPMATH_VARIABLES = ("ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE")
HEAD_PARAMETRIZATIONS = (UnitRows,)  # weight parametrisations whose value the certifier reads as is


class CertificationRefused(CllError):
    """The certifier cannot prove anything for this model, input or setting (the message says why)."""


def _name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules(remove_duplicate=False):
        if m is module:
            return name or type(model).__name__
    return type(module).__name__


def _owner(cls: type, attribute: str) -> type | None:
    return next((c for c in cls.__mro__ if attribute in c.__dict__), None)


def _overrides_its_bound(layer: nn.Module) -> str | None:
    """The name of a bound method that a subclass's ``forward`` no longer matches, else None."""
    if type(layer) in TORCH_LAYERS:  # exact types: the table's bound is theirs
        return None
    mro = type(layer).__mro__
    forward = mro.index(_owner(type(layer), "forward"))
    for attribute in ("upper_bound", "rounding", "forward64"):
        owner = _owner(type(layer), attribute)
        if owner is not None and mro.index(owner) > forward:
            return attribute
    return None


def check_environment() -> None:
    """Refuse settings that lower float32 arithmetic where the passes cannot switch them off."""
    for variable in FPMATH_VARIABLES:
        value = os.environ.get(variable, "")
        if value.strip().lower() not in ("", "strict"):
            raise CertificationRefused(
                f"{variable}={value} lets oneDNN compute float32 products in lower precision; unset it "
                "(or set strict) to certify"
            )
    modes = _get_current_dispatch_mode_stack() + [
        m for m in _get_current_function_mode_stack() if not isinstance(m, DeviceContext)
    ]
    if modes:
        raise CertificationRefused(
            f"a torch mode is active ({type(modes[-1]).__name__}): it may change what every operation "
            "computes; certify outside it"
        )


def check_model(model: nn.Module) -> None:
    """Refuse a model whose ``model(x)`` may not be the function the bound describes (see above)."""
    for attribute in ("body", "head", "in_shape"):
        if not hasattr(model, attribute):
            raise CertificationRefused(
                f"{type(model).__name__} has no {attribute}: cll certifies a LipschitzNet "
                "(wrap your layers with cll.api.lipschitz_net(layers, in_shape))"
            )
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        raise CertificationRefused(
            "a global module forward hook is registered (torch.nn.modules.module.register_module_forward_"
            "hook): it may change every layer's output; remove it to certify"
        )
    body, head = model.body, model.head
    if type(body) is not nn.Sequential:
        raise CertificationRefused(f"the body must be exactly an nn.Sequential, got {type(body).__name__}")
    if parametrize.type_before_parametrizations(head) is not nn.Linear:
        raise CertificationRefused(
            f"the head must be exactly an nn.Linear (its forward is what the certificate reads), got "
            f"{parametrize.type_before_parametrizations(head).__name__}"
        )
    if parametrize.is_parametrized(head):
        for name, chain in head.parametrizations.items():
            for p in chain:
                if not isinstance(p, HEAD_PARAMETRIZATIONS) or name != "weight":
                    raise CertificationRefused(
                        f"the head's {name} has the parametrisation {type(p).__name__}; allowed: "
                        "UnitRows on the weight (an LLN head)"
                    )
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks:
            raise CertificationRefused(
                f"{_name(model, module)} ({type(module).__name__}) has a forward hook: it may change the "
                "output the bound describes; remove it to certify"
            )
        if (
            "forward" in module.__dict__
            or "__call__" in module.__dict__
            or type(module).__call__ is not (nn.Module.__call__)
        ):
            raise CertificationRefused(
                f"{_name(model, module)} ({type(module).__name__}) has its forward or __call__ replaced; "
                "the bound describes the class's own forward"
            )
        if getattr(module, "inplace", False):
            raise CertificationRefused(
                f"{_name(model, module)} ({type(module).__name__}) works in place: it overwrites the "
                "inputs the rounding bound reads; use inplace=False"
            )
    for index, layer in enumerate(body):
        overridden = _overrides_its_bound(layer)
        if overridden is not None:
            raise CertificationRefused(
                f"body[{index}] ({type(layer).__name__}) overrides forward below the class that defines "
                f"{overridden}: give it its own upper_bound and rounding"
            )
    for name, tensor in [*body.named_parameters(), *head.named_parameters()]:
        if tensor.dtype != torch.float32:
            raise CertificationRefused(
                f"parameter {name} is {tensor.dtype}; the certifier proves float32 models (model.float())"
            )


def check_input(model: nn.Module, x: torch.Tensor, shape: tuple[int, ...] | None = None, dtype=torch.float32) -> None:
    """Refuse an input that is not a batch of ``shape`` (default ``model.in_shape``) in ``dtype``:
    every bound was computed at that shape."""
    shape = tuple(model.in_shape) if shape is None else tuple(shape)
    if not isinstance(x, torch.Tensor) or x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        got = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else type(x).__name__
        raise CertificationRefused(
            f"input shape {got} (without the batch axis) is not the model's in_shape {shape}: every "
            "bound holds at in_shape only"
        )
    if x.dtype != dtype:
        raise CertificationRefused(f"input dtype {x.dtype}; allowed: {dtype}")


class WeightsGuard:
    """A bitwise copy of a model's parameters and buffers when a certifier was built: ``check``
    refuses weights that changed since (whatever the write path) and re-checks the model."""

    def __init__(self, model: nn.Module):
        check_model(model)
        self.model = model
        self.copies = [t.detach().clone() for t in self._tensors()]

    def _tensors(self) -> list[torch.Tensor]:
        parts = (self.model.body, self.model.head)
        return [t for part in parts for t in (*part.parameters(), *part.buffers())]

    def check(self) -> None:
        check_environment()
        check_model(self.model)
        if not same_tensors(self._tensors(), self.copies):
            raise CertificationRefused(
                "the model's weights changed since this certifier was built: build a new one (its bound "
                "is that of the old weights)"
            )
