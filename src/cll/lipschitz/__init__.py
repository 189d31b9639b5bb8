"""Lipschitz constants of the networks: the sound certifying bound and the training estimate.

Two kinds of numbers, named for what they guarantee:

``upper_bound*`` (``bound.py``)
    Guaranteed >= the Lipschitz constant, in exact arithmetic, of the network as evaluated: the
    product of each body layer's own sound bound (each of cll's layers defines ``upper_bound`` next
    to its forward; torch's layer types are in a small table) times the head's largest pairwise row
    distance. The only numbers a certificate may rest on.
``estimate*`` (``estimate.py``)
    Power iteration on the true operators of the plain conv/linear layers, warm-started; approaches
    from *below*: for training (the K penalty) and for comparison (what the sound bound costs).

``operators.py`` holds the operator-norm maths (exact, FFT, Schur, Collatz-Wielandt bounds; head row
distances) and ``rounding.py`` the floating-point error maths; both are leaves that layers import.
"""

from .bound import (
    TORCH_LAYERS,
    check_supported,
    exact_constant,
    layer_rounding,
    upper_bound,
    upper_bound_body,
    upper_bound_head,
    upper_bound_layer,
    upper_bound_layers,
)
from .conv import conv_fft_bound, conv_norm_bound
from .estimate import (
    PowerIteration,
    estimate_body,
    estimate_constant,
    estimate_converged_body,
    power_iterate,
    power_norm,
)
from .operators import (
    ROUNDING_SLACK,
    conv_matrix,
    conv_output_hw,
    explicit_matrix,
    linear_operator,
    max_row_distance,
    nonnegative_norm_bound,
    row_distances,
    schur_bound,
    spectral_norm_exact,
    trace_input_shapes,
)
from .rounding import Rounding

__all__ = [
    "ROUNDING_SLACK",
    "TORCH_LAYERS",
    "PowerIteration",
    "Rounding",
    "check_supported",
    "conv_fft_bound",
    "conv_matrix",
    "conv_norm_bound",
    "conv_output_hw",
    "estimate_body",
    "estimate_constant",
    "estimate_converged_body",
    "exact_constant",
    "explicit_matrix",
    "layer_rounding",
    "linear_operator",
    "max_row_distance",
    "nonnegative_norm_bound",
    "power_iterate",
    "power_norm",
    "row_distances",
    "schur_bound",
    "spectral_norm_exact",
    "trace_input_shapes",
    "upper_bound",
    "upper_bound_body",
    "upper_bound_head",
    "upper_bound_layer",
    "upper_bound_layers",
]
