"""diffkernels' training losses under DistributedDataParallel: 2 gloo processes on CPU, float64.

Each case runs one optimizer step's forward and backward under DDP and checks that the gradient every
rank holds after DDP's all-reduce equals the gradient of one process over the same global batch (the
same t-draws, masks and data), computed here in plain PyTorch from the RNG's definition
(``diffkernels.rng.uniform``) rather than with the library's ops. The seeding is the one
docs/DISTRIBUTED.md recommends:

- t-samplers: one seed for the step on every rank, plus rank / world_size / micro_batch; the
  reference draws the whole global batch with ``sample_global`` and slices it itself (rank-major);
- masks (``mask_tokens``, MIRROR): ``fold_seed(step_seed, rank, micro_batch)``, token index local to
  the micro-batch;
- ``masked_diffusion_loss(normalizer="global", num_tokens=global eligible tokens / world_size)``:
  DDP averages gradients over ranks, so the per-rank losses must sum to world_size times the
  global-batch loss;
- ``sparse_mse_loss(..., seed=fold_seed(base, step, rank))`` with ``reduction="mean"``.

The LM is the masked-diffusion example's own ``TinyTransformer`` (imported from python_examples/),
made small and float64. In float64 the two sides differ only by summation order: tolerance 1e-10
relative to the gradient's largest entry (observed ~1e-15).
"""

import contextlib
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

try:
    from torch.distributed.fsdp import fully_shard  # FSDP2, torch >= 2.6
except ImportError:
    fully_shard = None

from diffkernels import fold_seed, sparse_mse_loss
from diffkernels.mdm import PPOTSGrid, PPOTSSampler, Stratified, mask_tokens, masked_diffusion_loss
from diffkernels.rng import uniform

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python_examples"))
import train_masked_diffusion_lm as lm_example  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: no OpenMP overhead

WORLD = 2
F64 = torch.float64
STEP_SEED = fold_seed(2024, 7)  # base seed 2024, step 7: the same on every rank
TASK = lm_example.AdditionTask(digits=2)  # rows of 10 tokens, the last 4 eligible
N = 4  # sequences per rank and micro-batch
EPS = lm_example.EPS
MASK = lm_example.MASK


def _samplers():
    # k = 5 strata never divide the global batch (8 or 16): unequal strata, weights != 1.
    grid = PPOTSGrid(t=torch.tensor([0.2, 0.5, 0.8]), g=torch.tensor([3.0, 1.5, 0.8]), v=torch.tensor([1.0, 0.5, 0.2]),
                     w=torch.tensor([3.0, 1.5, 0.8]).square().add(torch.tensor([1.0, 0.5, 0.2])).sqrt())
    return {"stratified": Stratified(k=5), "ppots": PPOTSSampler.from_grid(grid, mix=0.1, stratify=True, k=5)}


# (case name, sampler, micro-batches per rank)
LM_CASES = [("stratified", "stratified", 1), ("ppots", "ppots", 1), ("accumulation", "stratified", 2)]


def _make_lm() -> nn.Module:
    torch.manual_seed(0)
    return lm_example.TinyTransformer(TASK.length, dim=16, layers=1, heads=2).double()


def _lm_batch(G: int) -> torch.Tensor:
    return TASK.sample(G, torch.Generator().manual_seed(11))


class MDMLoss(nn.Module):
    """The loss inside forward: DDP sees the whole computation, and (under FSDP) the LM head's
    weight is the gathered one."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, masked, ids, importance, num_tokens):
        return masked_diffusion_loss(masked, ids, hidden=self.lm.hidden(masked.noisy_ids),
                                     lm_head_weight=self.lm.head.weight, importance=importance,
                                     normalizer="global", num_tokens=num_tokens)


def _ddp_lm_grads(sampler, rank: int, world: int, micro: int, fsdp: bool = False) -> list:
    if fsdp:  # FSDP2: each encoder layer its own unit, the rest (embedding, LM head) in the root's
        model = MDMLoss(_make_lm())
        for layer in model.lm.enc.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = nn.parallel.DistributedDataParallel(MDMLoss(_make_lm()))
    ids_all = _lm_batch(N * world * micro)  # the global batch; each rank takes its own rows
    eligible = TASK.eligible.expand(N, -1)
    num_tokens = TASK.eligible.sum().item() * N * world * micro / world  # DDP averages over ranks
    for mb in range(micro):
        s = rank * micro + mb
        ids = ids_all[s * N:(s + 1) * N]
        t, w = sampler.sample(N, STEP_SEED, rank=rank, world_size=world, micro_batch=mb, num_micro_batches=micro,
                              dtype=F64)
        masked = mask_tokens(ids, (1 - EPS) * t + EPS, fold_seed(STEP_SEED, rank, mb), mask_id=MASK,
                             eligible=eligible, mode="mirror")
        last = mb == micro - 1  # reduce the gradients across ranks once, after the last micro-batch
        if fsdp:
            model.set_requires_gradient_sync(last)
        with contextlib.nullcontext() if last or fsdp else model.no_sync():
            model(masked, ids, w, num_tokens).backward()
    if fsdp:  # sharded DTensor gradients: gather the full ones (a collective: every rank calls it)
        return [p.grad.full_tensor() for p in model.parameters()]
    return [p.grad.clone() for p in model.module.parameters()]


def _reference_lm_grads(sampler, world: int, micro: int, slices=None) -> list:
    """One process, the global batch in one forward, plain cross-entropy on the full logits.

    ``slices``: keep only these slices' sequences in the loss (a control that ranks differ)."""
    lm = _make_lm()
    S, L = world * micro, TASK.length
    G = N * S
    ids = _lm_batch(G)
    t, w = sampler.sample_global(G, STEP_SEED, dtype=F64)
    p = ((1 - EPS) * t + EPS).float()[:, None]  # mask_tokens thresholds and weights in float32
    # Slice s = rank * micro + micro_batch was masked with its rank's and micro-batch's seed, token
    # indices counted from the start of the slice.
    u = torch.cat([uniform(fold_seed(STEP_SEED, s // micro, s % micro), torch.arange(N * L)).view(N, L)
                   for s in range(S)])
    eligible = TASK.eligible.expand(G, L)
    copies = [(u < p) & eligible, (u > 1 - p) & eligible]  # MIRROR: one uniform, two antithetic masks
    logits = lm(torch.cat([torch.where(m, MASK, ids) for m in copies]))
    ce = F.cross_entropy(logits.transpose(1, 2), ids.repeat(2, 1), reduction="none").view(2, G, L)
    inv_p = (1.0 / p).double()  # float32 weights, as mask_tokens stores them
    per_seq = sum(0.5 * torch.where(m, ce[c] * inv_p, 0.0).sum(1) for c, m in enumerate(copies))
    keep = torch.ones(G, dtype=F64)
    if slices is not None:
        keep = torch.zeros(G, dtype=F64)
        for s in slices:
            keep[s * N:(s + 1) * N] = 1.0
    loss = (keep * w * per_seq).sum() / eligible.sum()
    return torch.autograd.grad(loss, list(lm.parameters()))


# --- sparse supervision: a tiny conv denoiser ---------------------------------------------------

B_IMG, C_IMG, H_IMG = 3, 2, 5  # images per rank, channels, height = width
MASK_RATIO = 0.75  # exact in float32: the threshold is the same in the kernel and the reference


def _make_denoiser() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(C_IMG, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, C_IMG, 3, padding=1)).double()


def _image_batch(world: int):
    g = torch.Generator().manual_seed(12)
    shape = (B_IMG * world, C_IMG, H_IMG, H_IMG)
    x, y = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    weight = torch.rand(B_IMG * world, generator=g, dtype=F64) + 0.5  # a per-sample loss weight, like EDM's
    return x, y, weight


def _ddp_sparse_grads(rank: int, world: int) -> list:
    model = nn.parallel.DistributedDataParallel(_make_denoiser())
    x, y, weight = (v[rank * B_IMG:(rank + 1) * B_IMG] for v in _image_batch(world))
    loss = sparse_mse_loss(model(x), y, MASK_RATIO, fold_seed(2024, 7, rank), weight=weight, granularity="pixel")
    loss.backward()
    return [p.grad.clone() for p in model.module.parameters()]


def _reference_sparse_grads(world: int, ranks=None) -> list:
    net = _make_denoiser()
    x, y, weight = _image_batch(world)
    ranks = range(world) if ranks is None else ranks
    # Pixel granularity: one uniform per (sample, pixel), index counted within the rank's batch.
    keep = torch.cat([uniform(fold_seed(2024, 7, r), torch.arange(B_IMG * H_IMG * H_IMG)).view(B_IMG, 1, H_IMG, H_IMG)
                      for r in range(world)]) >= MASK_RATIO
    sq = torch.where(keep, (net(x) - y) ** 2, 0.0).flatten(1).sum(1)
    per_sample = weight * sq / (C_IMG * H_IMG * H_IMG * (1 - MASK_RATIO))  # normalize="expected"
    used = torch.zeros(B_IMG * world, dtype=F64)
    for r in ranks:
        used[r * B_IMG:(r + 1) * B_IMG] = 1.0
    return torch.autograd.grad((used * per_sample).sum() / (B_IMG * world), list(net.parameters()))


# --- the two processes ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        samplers = _samplers()
        results = {name: _ddp_lm_grads(samplers[s], rank, world, micro) for name, s, micro in LM_CASES}
        if fully_shard is not None:
            results["fsdp"] = _ddp_lm_grads(samplers["stratified"], rank, world, 2, fsdp=True)
        results["sparse"] = _ddp_sparse_grads(rank, world)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _assert_grads_close(got, want, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        scale = float(w.abs().max())
        assert scale > 0, f"{what}: reference gradient {i} is zero"
        err = float((g - w).abs().max())
        assert err <= 1e-10 * scale, f"{what}: parameter {i}: max |diff| {err:.3g} vs max |grad| {scale:.3g}"


def _assert_ranks_contribute(full, part, what):
    # A control: one rank's part of the batch alone gives a clearly different gradient, so the
    # comparison above could not pass if a rank's data, t-draws or masks were wrong.
    rel = max(float((f - p).abs().max() / f.abs().max()) for f, p in zip(full, part))
    assert rel > 1e-3, f"{what}: the ranks' contributions are indistinguishable ({rel:.3g})"


@pytest.mark.parametrize("name,sampler,micro", LM_CASES, ids=[c[0] for c in LM_CASES])
def test_mdm_ddp_gradient_equals_single_process(ddp_grads, name, sampler, micro):
    sampler = _samplers()[sampler]
    want = _reference_lm_grads(sampler, WORLD, micro)
    for rank, got in enumerate(ddp_grads):
        _assert_grads_close(got[name], want, f"{name}, rank {rank}")
    _assert_ranks_contribute(want, _reference_lm_grads(sampler, WORLD, micro, slices=range(micro)), name)


@pytest.mark.skipif(fully_shard is None, reason="FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")
def test_mdm_fsdp_gradient_equals_single_process(ddp_grads):
    # FSDP2 with gradient accumulation: the same recipe as DDP (FSDP averages over ranks too).
    want = _reference_lm_grads(_samplers()["stratified"], WORLD, 2)
    for rank, got in enumerate(ddp_grads):
        _assert_grads_close(got["fsdp"], want, f"fsdp, rank {rank}")


def test_sparse_mse_ddp_gradient_equals_single_process(ddp_grads):
    want = _reference_sparse_grads(WORLD)
    for rank, got in enumerate(ddp_grads):
        _assert_grads_close(got["sparse"], want, f"sparse, rank {rank}")
    _assert_ranks_contribute(want, _reference_sparse_grads(WORLD, ranks=[0]), "sparse")
