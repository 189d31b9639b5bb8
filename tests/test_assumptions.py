"""The sound bounds rest on no unproved accuracy claim: eigensolver, cancellation, libm trig."""

import math

import mpmath
import pytest
import torch

from cll.errors import CllError
from cll.layers import activations
from cll.layers.activations import HouseHolder
from cll.layers.sll import SLLLinear
from cll.lipschitz import operators
from cll.lipschitz.operators import gram_top_bound, top_eigenvalue_bound


def exact_top(g: torch.Tensor) -> mpmath.mpf:
    """lambda_max of a Hermitian float64 matrix (read as exact), by mpmath at 50 digits."""
    with mpmath.workdps(50):
        entry = complex if g.is_complex() else float
        m = mpmath.matrix([[entry(z) for z in row] for row in g.tolist()])
        values = mpmath.eighe(m, eigvals_only=True) if g.is_complex() else mpmath.eigsy(m, eigvals_only=True)
        return max(values)


def integer_grams() -> list[torch.Tensor]:
    """Gram matrices of small integer (real) and Gaussian-integer (complex) matrices: exact in float64."""
    gen = torch.Generator().manual_seed(0)
    b = torch.randint(-9, 10, (10, 7), generator=gen).double()
    c = torch.complex(*torch.randint(-9, 10, (2, 6, 5), generator=gen).double())
    return [b.t() @ b, c.mH @ c]


@pytest.mark.parametrize("index", [0, 1])
def test_top_eigenvalue_bound_is_a_tight_upper_bound(index):
    g = integer_grams()[index]
    exact = exact_top(g)
    bound = top_eigenvalue_bound(g).item()
    assert mpmath.mpf(bound) >= exact
    assert bound <= float(exact) * (1 + 1e-12)
    # batched: one bound per matrix
    assert top_eigenvalue_bound(torch.stack([g, 2 * g])).shape == (2,)


@pytest.mark.parametrize("index", [0, 1])
def test_top_eigenvalue_bound_catches_a_wrong_eigendecomposition(monkeypatch, index):
    # an eigensolver whose eigenvalues are 1e-3 too low and whose vectors are not orthonormal: the
    # eigenvalues alone would under-state lambda_max, the residual and orthogonality terms do not
    g = integer_grams()[index]
    exact = exact_top(g)
    real_eigh = torch.linalg.eigh

    def low_values(a):
        lam, v = real_eigh(a)
        return lam * (1 - 1e-3), v

    def short_vectors(a):
        lam, v = real_eigh(a)
        return lam, v * (1 - 1e-3)

    assert mpmath.mpf(low_values(g)[0][-1].item()) < exact
    for fake in (low_values, short_vectors):
        monkeypatch.setattr(torch.linalg, "eigh", fake)
        assert mpmath.mpf(top_eigenvalue_bound(g).item()) >= exact


def test_gram_top_bound_covers_the_exact_norm():
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(-99, 100, (9, 14), generator=gen).double()
    exact = exact_top(a @ a.t())  # integer entries: this Gram matrix is exact
    assert mpmath.mpf(gram_top_bound(a).item()) >= exact
    norm = operators.spectral_norm_exact(a)
    assert mpmath.mpf(norm) ** 2 >= exact
    assert norm == pytest.approx(math.sqrt(float(exact)), rel=2e-9)  # ROUNDING_SLACK


def test_sll_norm_bound_survives_cancellation():
    # rows (A, 1, A) and (A, 1, -A), A = 2^27: the exact inner product 1 is lost in float64
    # (2^54 + 1 rounds to 2^54), so |fl(W W^T)| alone under-states |W W^T|
    layer = SLLLinear(3, 2).eval()
    a = 2.0**27
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[a, 1.0, a], [a, 1.0, -a]]))
        layer.q.copy_(torch.tensor([0.0, 3.0]))
    bound = layer._gram_bound()
    with mpmath.workdps(50):
        g = mpmath.matrix([[2 * mpmath.mpf(a) ** 2 + 1, 1], [1, 2 * mpmath.mpf(a) ** 2 + 1]])
        assert all(mpmath.mpf(bound[i, j].item()) >= abs(g[i, j]) for i in range(2) for j in range(2))
        t_inv = [mpmath.mpf(x) for x in layer.derived(layer.inverse_t).double().tolist()]
        m = mpmath.matrix([[g[i, j] * mpmath.sqrt(t_inv[i] * t_inv[j]) for j in range(2)] for i in range(2)])
        norm_sq = max(mpmath.eigsy(m, eigvals_only=True))
        assert mpmath.mpf(layer._norm_m()) ** 2 >= norm_sq


def ten_ulps_up(fn):
    def shifted(x):
        y = fn(x)
        for _ in range(10):
            y = torch.nextafter(y, torch.full_like(y, math.inf))
        return y

    return shifted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trig_accuracy_is_checked_on_the_angles_in_use(monkeypatch, dtype):
    layer = HouseHolder(64)
    with torch.no_grad():
        layer.theta.copy_(torch.linspace(-4, 4, 32))
        layer.theta[0] = 0.0
    activations._trig_ulps.cache_clear()
    layer.rounding((64, 2, 2), dtype)  # the real sin and cos pass
    for name in ("sin", "cos"):
        activations._trig_ulps.cache_clear()
        monkeypatch.setattr(torch, name, ten_ulps_up(getattr(torch, name)))
        with pytest.raises(CllError, match="ulps"):
            layer.rounding((64, 2, 2), dtype)
        monkeypatch.undo()
    activations._trig_ulps.cache_clear()
