"""DP-SGD on top of ``per_sample_grads``: sampling, clipping, noise, accounting.

The short loop (Abadi et al. 2016, "Deep Learning with Differential Privacy",
with Poisson sampling, the setting the accountants analyse)::

    dp = DPSGD(model, optimizer, dataset_size=len(x), expected_batch_size=256,
               target_epsilon=3.0, delta=1e-5, epochs=20, max_norm=1.0)
    for idx in dp.batches():
        with dp.step():
            F.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()
    dp.epsilon()

Files: :mod:`.dpsgd` (the loop object), :mod:`.logical` (one logical batch:
micro-batches, one noise draw, one all-reduce), :mod:`.clipping` (styles),
:mod:`.mechanism` (``privatize_``, ``add_noise_``: the low-level steps),
:mod:`.sampling` (Poisson), :mod:`.accounting` (Opacus' accountants).

What the guarantee covers. The (epsilon, delta) reported is that of the
Poisson-subsampled Gaussian mechanism: each step includes each training example
independently with probability ``q`` (``DPSGD`` samples so; with the low-level
steps use :class:`PoissonBatchSampler` and take the step even for an empty
batch), clips every example's gradient over *all* trained parameters (a result
that left some out is refused), adds Gaussian noise of std ``noise_multiplier``
times the clipping's sensitivity to the *sum*, once per logical batch, and
divides by a constant (the expected batch size), never by the realised batch
size. Fixed-size shuffled batches are not what the analysis assumes: no
epsilon here is a guarantee for them, and ``DPSGD`` has no such mode. Only the
model, or the noisy gradients, may be released: per-sample norms, clip factors,
losses and anything else computed from the batch are not private. The noise
comes from PyTorch's (non-cryptographic) generator and floating-point Gaussian
sampler, as in Opacus without ``secure_mode``: not hardened against
floating-point attacks (Mironov 2012).

Accounting calls Opacus' accountants (the optional extra: ``pip install
'gradhooks[privacy]'``, i.e. ``opacus``); nothing here re-derives them.
"""

from __future__ import annotations

from .accounting import Accountant, Mechanism, epsilon, noise_multiplier_for
from .clipping import AdaptiveClipping, AutomaticClipping, Clipping, FlatClipping, PerGroupClipping
from .dpsgd import DPSGD
from .errors import DPUsageError, PrivacyBudgetError, UncoveredParameterError
from .mechanism import add_noise_, privatize_
from .sampling import PoissonBatchSampler

__all__ = [
    "Accountant",
    "AdaptiveClipping",
    "AutomaticClipping",
    "Clipping",
    "DPSGD",
    "DPUsageError",
    "FlatClipping",
    "Mechanism",
    "PerGroupClipping",
    "PoissonBatchSampler",
    "PrivacyBudgetError",
    "UncoveredParameterError",
    "add_noise_",
    "epsilon",
    "noise_multiplier_for",
    "privatize_",
]
