"""Small parameter-free maps, the unit-row (LLN) head and the evaluation cache.

- ``Normalize``: (x - mean) / std with one std for every channel; Lipschitz factor 1/std.
- ``PaddingChannels``: zero-pads the channel axis (an isometry, as in CPL and SLL's first layer).
- ``unit_row_head``: a linear classifier whose rows are normalised to unit l2 norm at every use
  ("last layer normalisation", LLN; Singla et al., ICLR 2022). It is a ``torch.nn.utils.
  parametrize`` parametrisation of ``weight``, so ``head.weight`` *is* the normalised matrix
  everywhere (the loss, the certifier, the K penalty) and nothing else needs to know. An LLN head
  is not globally 1-Lipschitz; the certifier's pairwise rule ||W_j - W_i|| is what makes it sound.
- ``EvalCache``: what an evaluation-mode forward derives from the parameters, computed once.
- ``one_cpu_thread``: the batched linear solves of the layers that orthogonalise (Sandwich, BRO) run
  on one CPU thread (a fault of torch's MKL, below).

Every layer of cll bounds itself next to its forward (``upper_bound``, ``rounding``; see
``cll.lipschitz.bound``); ``exact_bound`` marks a bound that is the Lipschitz constant itself.
"""

from __future__ import annotations

import math
import struct
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..lipschitz.operators import ROUNDING_SLACK
from ..lipschitz.rounding import EXACT, Rounding, gamma, underflow


def float32_value(x: float) -> float:
    """``x`` rounded to float32, as a Python float: the constant a float32 forward really uses (a
    Python scalar meets a float32 tensor as float32), so a float64 evaluation can use it too."""
    return struct.unpack("f", struct.pack("f", x))[0]  # round to nearest, like a tensor conversion


class Normalize(nn.Module):
    """(x - mean) / std, mean per channel, std a nonzero finite scalar (SOC's 0.2507; 1 = mean shift
    only).

    ``std`` is kept as its float32 value: the network certified divides by what the float32 forward
    divides by. Its factor is 1/|std| (a negative std flips signs, which changes no norm)."""

    exact_bound = True

    def __init__(self, mean, std: float = 1.0):
        super().__init__()
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]))
        self.std = float32_value(std)
        if not (math.isfinite(self.std) and self.std != 0):
            raise ValueError(f"Normalize: std {std!r} must be a finite number other than 0 (in float32)")

    @property
    def lipschitz(self) -> float:
        return 1.0 / abs(self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.view((1, -1) + (1,) * (x.dim() - 2))) / self.std

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        return self.lipschitz * (1 + ROUNDING_SLACK)

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        """A subtraction and a division per entry; CUDA divides a tensor by a Python scalar as
        ``x * fl(1/std)`` (a rounded reciprocal and a product), so three roundings are allowed, not
        two: <= gamma_3 |x - mean| / |std|, and ||x - mean|| <= ||x|| + ||mean|| sqrt(H W)."""
        g, pixels = gamma(3, dtype), math.prod(in_shape[1:])
        mean = self.mean.double().norm().item() * math.sqrt(pixels)
        return Rounding(g * self.lipschitz, g * mean * self.lipschitz + underflow(3, math.prod(in_shape), dtype))


class PaddingChannels(nn.Module):
    """(N, C, H, W) -> (N, channels, H, W), the new channels zero (an isometry, exact)."""

    exact_bound = True

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        return 1.0

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        return EXACT


class UnitRows(nn.Module):
    """W -> W with every row divided by its l2 norm."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)


def unit_row_head(in_features: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(in_features, num_classes)
    parametrize.register_parametrization(head, "weight", UnitRows())
    return head


def truncation_head(in_features: int, num_classes: int) -> nn.Linear:
    """The first ``num_classes`` features as the logits, CPL's and SLL's default last layer
    (``PoolingLinear(agg="trunc")``): a fixed ``nn.Linear`` with W = [I 0], no bias, not trained;
    every row distance ||W_i - W_j|| is sqrt 2."""
    if in_features < num_classes:
        raise ValueError(f"a truncation head needs >= {num_classes} features, got {in_features}")
    head = nn.Linear(in_features, num_classes, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(num_classes, in_features))
    head.weight.requires_grad_(False)
    return head


class EvalCache(nn.Module):
    """A layer that caches what its evaluation-mode forward derives from the parameters (SOC's
    rescaled kernel, CPL's step, SLL's 1/t, Sandwich's orthogonal factors), so that the forward
    passes, the sound bound and the float64 pass of the certifier all see the *same* derived
    float32 tensors. The cache never outlives the weights it came from: it keeps a copy of every
    parameter and buffer of the layer and is used only while they are bit for bit the same
    (whatever wrote them: an optimizer step, ``load_state_dict``, ``.to()``, ``p.data``), and it is
    also dropped on ``train()``/``eval()`` switches and by ``load_state_dict`` (a hook that receives
    the module, so a deep copy's hook clears the copy's cache, not the original's)."""

    def __init__(self):
        super().__init__()
        self._cache: dict | None = None
        self._cache_key: list[torch.Tensor] | None = None  # the weights the cache was made from
        self._register_load_state_dict_pre_hook(EvalCache._drop_on_load, with_module=True)

    @staticmethod
    def _drop_on_load(module: EvalCache, *args, **kwargs) -> None:
        module.clear_cache()

    def clear_cache(self) -> None:
        self._cache = self._cache_key = None

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def _weights(self) -> list[torch.Tensor]:
        return [*self.parameters(recurse=False), *self.buffers(recurse=False)]

    def _is_current(self) -> bool:
        """The cache was made from exactly the present weights: compared bit for bit, since a write
        through ``p.data`` (or ``set_``) changes neither a tensor's storage nor its version."""
        return self._cache_key is not None and same_tensors(self._weights(), self._cache_key)

    def cached(self, make):
        """``make()`` with gradient in training mode; ``derived(make)`` in evaluation mode."""
        return make() if self.training else self.derived(make)

    def derived(self, make, name: str | None = None):
        """What the evaluation forward derives from the parameters (``make()``, no gradient), in either
        mode, computed once per set of weights (one entry per ``name``, default ``make``'s name)."""
        if self._cache is None or not self._is_current():
            self._cache, self._cache_key = {}, [t.detach().clone() for t in self._weights()]
        name = name or make.__name__
        if name not in self._cache:
            with torch.no_grad():
                self._cache[name] = make()
        return self._cache[name]


def same_tensor(t: torch.Tensor, saved: torch.Tensor) -> bool:
    """``t`` holds bit for bit ``saved``'s values (-0.0 differs from 0.0, a NaN equals the same NaN),
    with its shape, dtype and device."""

    def bits(v: torch.Tensor) -> torch.Tensor:
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        return v.detach().view(ints[v.element_size()]) if v.is_floating_point() else v.detach()

    return (
        t.shape == saved.shape
        and t.dtype == saved.dtype
        and t.device == saved.device
        and torch.equal(bits(t), bits(saved))
    )


def same_tensors(now: list[torch.Tensor], saved: list[torch.Tensor]) -> bool:
    """As many tensors as ``saved``, each ``same_tensor`` as its copy there."""
    return len(now) == len(saved) and all(map(same_tensor, now, saved))


@contextmanager
def one_cpu_thread(device: torch.device):
    """One intra-op thread on the CPU. The MKL that ships with torch 2.14.1 fails batched LU
    factorisations of matrices from about 256 x 256 when it runs on 2 or more threads ("Parameter 6
    was incorrect on entry to CLASWP", then "Pivots given to lu_solve must all be greater or equal
    to 1"): a 256-channel Sandwich layer hits it; on one thread the same solve is correct."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
