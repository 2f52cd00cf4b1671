"""The optimal denoiser E[x0 | x] over a whole dataset, streamed over the data, and exact knn.

For a query x and data rows y_n the posterior weights are w_n = softmax_n(-||x - alpha y_n||^2 / (2 sigma^2)),
the denoiser is D(x) = sum_n w_n y_n and the posterior variance is tr Cov = sum_n w_n ||y_n - D(x)||^2.

The precision hazard: logits are ~1/sigma^2 times squared distances, so at sigma = 2e-3 times the
data scale the expanded-form distances ||x||^2 + ||y||^2 - 2 x.y need ~1e-12 relative accuracy;
float32, TF32 or bf16 products lose the O(1) logit differences that decide the softmax. Two
engines; the rows that carry the posterior mass are exact to float64 rounding in both, and "auto"
also drops rows proven to weigh below e^-40 of the best one (docs/METHODS.md section 3.3):

* ``precision="float64"`` (:mod:`.float64_engine`): every product in float64, two GEMMs per data
  chunk (logits and sums), the few heaviest rows per query by direct differences.
* ``precision="auto"`` (:mod:`.screen_engine`), in two phases. Screen: one fp32-accurate GEMM per
  chunk (float32 on the CPU, three TF32 tensor-core products on CUDA; :mod:`.fp32_gemm`) gives every
  logit to within a bound E, and each query keeps its SCREEN_TOP + 1 best rows over all chunks.
  Refine, once per query block after the last chunk: the SCREEN_TOP best rows are recomputed exactly
  in float64 by direct differences, and the query is proven when every other row lies more than
  NEGLIGIBLE_NATS (e^-40 each) below the best even after the error bound, and the dropped rows
  cannot move the variance. Unproven queries (the posterior spread over more rows, i.e. larger sigma,
  or norms beyond the float32 screen's range) go to the float64 engine over all the data. A block
  whose queries fail too often on the first chunk uses the float64 engine from there on. The
  win is at small and moderate sigma, where the posterior sits on a few rows: one GEMM at fp32 speed
  instead of two at float64 speed.

Both engines implement one interface (:class:`~.blocks.BlockEngine`): built for a
:class:`~.blocks.QueryBlock`, fed every :class:`~.blocks.Chunk` of a :class:`~.streaming.DataSource`,
then asked for the block's :class:`~.partials.PosteriorPartial`. :func:`knn` has the same two engines
(:mod:`.nearest_neighbours`).

The data is streamed in chunks converted on the fly, so memory stays O(M * D + M * chunk) and the
data may be float32, bfloat16 or float16, on the device or in host memory. Each partial keeps its
sums relative to a per-query reference point inside the posterior mass (a data row), so small
variances of near-duplicate data are differences of small numbers, never of two large ones.

Bad values: NaN or Inf in the queries or the data is a ValueError in :func:`posterior_mean`,
:func:`posterior_partial` and :func:`knn` alike. Values of any finite magnitude are exact: outside
the safe range the computation is repeated on queries, data and sigma divided by a power of two,
which leaves the logits unchanged. A sigma so small that a query's largest logit leaves float64's
range (its posterior is then a delta on the nearest row, but its normaliser is not representable)
is a ValueError naming sigma.
"""

from .api import knn, posterior_mean, posterior_partial
from .partials import PosteriorPartial, PosteriorStats, empty_partial, merge_partials

__all__ = [
    "PosteriorPartial",
    "PosteriorStats",
    "empty_partial",
    "knn",
    "merge_partials",
    "posterior_mean",
    "posterior_partial",
]
