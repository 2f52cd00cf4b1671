"""Estimators of the optimal loss curve J*(s) of a dataset: :func:`estimate_curve`.

For data {x_n} (N rows of D elements) and a VE noise level s, queries are x = x_{n_m} + s eps_m with
n_m uniform over the data and eps_m ~ N(0, I). Four estimators of J*(s) = E||x0 - D(x)||^2:

- ``"full"``: the posterior D(x) over all N rows. Reported in two forms, both unbiased:
  the posterior-variance form mean_m tr Cov[x0 | x_m] (the low-variance one, ``j_star_var``) and
  the A - B form mean_m (||x_{n_m}||^2 - ||D(x_m)||^2) (``j_star_ab``).
- ``"snis"``: D over a uniform random subset of L rows (self-normalised importance sampling).
- ``"dol"``: the subset plus the query's source row n_m (counted once: it is excluded from the
  subset when the subset happens to contain it). Biased low.
- ``"cdol"``: as ``"dol"`` with the source row's weight divided by C (its logit gets -log C);
  C = 1 is DOL, C -> infinity is SNIS over the subset without the source row. Default C = 4N/L.
  The subset estimators use the A - B form.

The A of the A - B form is taken over the queries' own source rows, not over the whole dataset:
both terms then share the data noise, and their difference stays accurate at small s where
J* << E||x0||^2. Everything is computed on the data centred on its mean mu (A = ||x_src - mu||^2,
B = ||D - mu||^2; the identity E||x0 - D||^2 = A - B holds about any fixed point), so every
estimator is invariant to adding a constant vector to the data: uncentred, the subset estimators'
A - B picks up 2 mu . (x_src - D), whose mean is not zero for a biased D and whose spread grows with
||mu||. Each query's difference is computed as (x_src - D) . (x_src + D) in float64, centred.

Reproducibility. Queries come in fixed blocks of ``QUERY_BLOCK`` queries. Block b of noise level k
draws its source rows (and, for the subset estimators, its subset of L rows, shared by the block's
queries) from a CPU generator seeded with ``fold_seed(seed, INDEX_STREAM, k, b)``, and its noise
from a generator on the compute device seeded with ``fold_seed(seed, NOISE_STREAM, k, b)``. So
noise levels and blocks are independent streams, a level can be recomputed on its own (resume),
``batch_size`` changes only the float rounding, not the draws, and every rank of a distributed run
draws the same queries. The noise differs between CPU and CUDA generators: the same seed on a GPU
gives statistically equivalent, not identical, queries.

Common random numbers. With ``common_random_numbers=True`` every level uses the draws of level 0
(the same source rows, subsets and unit noise eps, so x = x_n + s eps moves with s only). Each
level's estimate is then the one an independent run would give at that s alone, so it is still
unbiased, but the levels' errors are correlated: the curve is smooth across s and differences
between levels are far more precise. The per-level standard errors are unchanged and do not apply
to such differences.

Standard errors. Per block the sum and the sum of squared deviations of the per-query values are
kept in float64 on the device (no host sync inside a level; one transfer at its end) and combined
exactly (Chan et al.). ``"full"`` reports the standard error over queries. The subset estimators
report the standard error over blocks (queries of one block share a subset, so their errors are
correlated and the per-query formula would be too small); with a single block they fall back to
the per-query formula.

Data. A tensor on any device (streamed to the compute device tile by tile), or a numpy array /
``np.memmap`` of any size (read in host chunks of ``HOST_CHUNK_ELEMENTS`` elements and streamed
through :func:`~diffkernels.optimal_loss.posterior_partial`; partials merge exactly). Integer data
is converted to float32. With ``distributed=True`` (see :mod:`diffkernels.optimal_loss.distributed`)
``data`` is this rank's shard. One pass over the data before the first level rejects NaN / Inf rows
and computes the mean mu (summed over all ranks, so every rank uses the same one) and a checksum of
every value (:func:`~.data.data_checksum`).

Checkpoints. With ``checkpoint=path`` the results of each finished noise level are written to a
JSON file atomically (temporary file in the same directory, fsync, ``os.replace``), so a crash
never leaves a corrupt file; a later call with the same settings and data loads the finished
levels and computes only the rest, and the result equals an uninterrupted run exactly (JSON keeps
floats exactly). Different settings, different data (the checksum of all values) or a malformed
file are an error.

Modules: :mod:`.curve` (estimate_curve and one noise level), :mod:`.sampling` (the draws),
:mod:`.statistics` (means and standard errors), :mod:`.data` (data access, centring, checksum),
:mod:`.checkpoint` and :mod:`.result` (CurveResult, its dicts and CSV).
"""

from .curve import ESTIMATORS, estimate_curve
from .result import CurveResult
from .sampling import QUERY_BLOCK, block_draws

__all__ = ["CurveResult", "estimate_curve", "ESTIMATORS", "QUERY_BLOCK", "block_draws"]
