"""diffkernels.integrations.transformers: the fused MDM loss of a transformers model and MaskedDiffusionTrainer.

Every model is built from a tiny config (hidden 32, 2 layers, vocabulary 64): nothing is downloaded. The
reference is the model's own full forward pass (all logits) followed by a plain float64 cross-entropy with
the same masks and weights.
"""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from diffkernels import fold_seed, mdm  # noqa: E402
from diffkernels.integrations.transformers import (  # noqa: E402
    find_backbone,
    make_bidirectional,
    masked_diffusion_loss_from_model,
)

V = 64
MASK = V - 1


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def llama(vocab=V, **kw):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, **kw)
    return transformers.LlamaForCausalLM(cfg)


def gpt2(**kw):  # tied embeddings, Conv1D layers, learned positions
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def phi(**kw):  # an LM head with a bias
    cfg = transformers.PhiConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, **kw)
    return transformers.PhiForCausalLM(cfg)


def cohere(**kw):  # logits = logit_scale * lm_head(h)
    cfg = transformers.CohereConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, logit_scale=0.25, **kw)
    return transformers.CohereForCausalLM(cfg)


def batch(gen, B=4, L=16):
    """Token ids (never the mask id), a padded last row and a 2-token prompt that is never masked."""
    ids = torch.randint(0, MASK, (B, L), generator=gen)
    attention = torch.ones(B, L, dtype=torch.int64)
    attention[-1, L - 3:] = 0
    eligible = torch.ones(B, L, dtype=torch.bool)
    eligible[:, :2] = False
    return ids, attention, eligible


def reference_loss(model, ids, attention, out):
    """The same loss from the model's full logits: sum over rows of row_weight * importance / (P_b B) *
    sum over masked tokens of weight * CE, CE in float64."""
    m = out.masked
    rows = m.source_row
    logits = model(input_ids=m.noisy_ids, attention_mask=attention[rows]).logits
    ce = F.cross_entropy(logits.double().transpose(1, 2), ids[rows], reduction="none")
    per_row = m.row_weight.double() * out.weight.double()[rows] / (m.eligible_count.double()[rows] * ids.shape[0])
    return (m.weights.double() * per_row[:, None] * ce).sum()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(model, ids, attention, eligible, *, rtol, **kw):
    model.zero_grad(set_to_none=True)
    loss, out = masked_diffusion_loss_from_model(model, ids, mask_id=MASK, seed=11, attention_mask=attention,
                                                 eligible=eligible, return_outputs=True, **kw)
    assert int(out.masked.masked.sum()) > 0
    loss.backward()
    fused = grads(model)
    model.zero_grad(set_to_none=True)
    ref = reference_loss(model, ids, attention, out)
    ref.backward()
    expected = grads(model)
    torch.testing.assert_close(loss.double(), ref.to(loss.device), rtol=rtol, atol=0)
    assert fused.keys() == expected.keys() and len(fused) == len(list(model.parameters()))
    for name, g in expected.items():
        torch.testing.assert_close(fused[name].double(), g.double(), rtol=rtol, atol=rtol * float(g.abs().max()),
                                   msg=lambda m: f"{name}: {m}")
    return out


# --- the loss against the full-logits computation ---------------------------------------------------


@pytest.mark.parametrize("arch", [llama, gpt2, phi, cohere])
@pytest.mark.parametrize("mode", ["standard", "mirror"])
def test_loss_and_every_gradient_match_full_logits_float64(arch, mode, gen):
    # float64 end to end: both sides differ only by summation order, so 1e-10 is ~10^6 ulps of slack.
    model = arch().double()
    make_bidirectional(model)
    ids, attention, eligible = batch(gen)
    grid = mdm.PPOTSSampler(torch.linspace(0, 1, 5, dtype=torch.float64), [1.0, 3.0, 2.0, 1.0, 4.0], mix=0.1)
    out = assert_same_loss_and_grads(model, ids, attention, eligible, sampler=grid, mode=mode, rtol=1e-10)
    assert not torch.allclose(out.weight, torch.ones_like(out.weight))  # the importance weights were used
    assert not out.masked.masked[:, :2].any() and not out.masked.masked[-1, -3:].any()


def test_explicit_backbone_and_causal_model_float32(gen):
    # The backbone path, a causal (unmodified) model and float32: the CE is accumulated in float32 over a few
    # dozen tokens on both sides, so relative differences stay below ~1e-5.
    model = llama()
    ids, attention, eligible = batch(gen)
    assert find_backbone(model) is model.model
    for backbone in (None, find_backbone(model)):
        assert_same_loss_and_grads(model, ids, attention, eligible, sampler=mdm.Stratified(), backbone=backbone,
                                   rtol=2e-5)


@pytest.mark.parametrize("where", ["around the call", "inside forward"])
def test_autocast_runs_the_head_in_the_autocast_dtype(where, gen, monkeypatch):
    # Under bf16 autocast Llama's final norm returns float32 while its head runs in bf16: the fused loss must
    # use the bf16 head too, whether autocast wraps the call or only the model's forward (as accelerate's
    # mixed precision does). Both sides then have the same bf16 logits and differ by the CE's float32
    # accumulation (< 1e-7 relative over 100 seeds; a float32 head is off by > 2e-7).
    model = llama()
    ids, attention, eligible = batch(gen)
    seen = []
    original = mdm.masked_diffusion_loss

    def spy(*args, **kw):
        seen.append((kw["hidden"].dtype, kw["lm_head_weight"].dtype))
        return original(*args, **kw)

    monkeypatch.setattr(mdm, "masked_diffusion_loss", spy)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    if where == "inside forward":
        model.forward = bf16(model.forward)
        bf16 = torch.autocast("cpu", enabled=False)
    with bf16:
        loss, out = masked_diffusion_loss_from_model(model, ids, mask_id=MASK, seed=3, sampler=mdm.Uniform(),
                                                     attention_mask=attention, eligible=eligible, return_outputs=True)
        ref = reference_loss(model, ids, attention, out)
    loss.backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert loss.dtype == torch.float32 and model.lm_head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)


# --- logit transforms and bad input --------------------------------------------------------------


def test_softcapped_logits_are_refused(gen):
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = transformers.Gemma2ForCausalLM(cfg)
    ids, attention, _ = batch(gen)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        masked_diffusion_loss_from_model(model, ids, mask_id=MASK, seed=0, sampler=mdm.Uniform())


class DoubledLogits(transformers.LlamaForCausalLM):
    """Transforms its logits after the head in a way no config attribute announces."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 2 * out.logits
        return out


def test_an_unknown_logit_transform_is_caught(gen):
    model = DoubledLogits(llama().config)
    ids, _, _ = batch(gen)
    with pytest.raises(ValueError, match="not 1 \\* \\(hidden @ W\\^T \\+ b\\)"):
        masked_diffusion_loss_from_model(model, ids, mask_id=MASK, seed=0, sampler=mdm.Uniform())


def test_bad_arguments_get_clear_errors(gen):
    model = llama()
    ids, attention, eligible = batch(gen)
    kw = dict(seed=0, sampler=mdm.Uniform())
    with pytest.raises(ValueError, match="mask_id must be a token id in \\[0, 64\\)"):
        masked_diffusion_loss_from_model(model, ids, mask_id=V, **kw)
    with pytest.raises(TypeError, match="sampler must be"):
        masked_diffusion_loss_from_model(model, ids, mask_id=MASK, seed=0, sampler=lambda n, s: None)
    with pytest.raises(ValueError, match="no output embeddings"):
        masked_diffusion_loss_from_model(model.model, ids, mask_id=MASK, **kw)
    with pytest.raises(ValueError, match="attention_mask must be"):
        masked_diffusion_loss_from_model(model, ids, mask_id=MASK, attention_mask=attention[:, :-1], **kw)
    with pytest.raises(ValueError, match="eligible must be"):
        masked_diffusion_loss_from_model(model, ids, mask_id=MASK, eligible=eligible.long(), **kw)
    with pytest.raises(ValueError, match="model_kwargs must not contain 'labels'"):
        masked_diffusion_loss_from_model(model, ids, mask_id=MASK, model_kwargs={"labels": ids}, **kw)
    with pytest.raises(ValueError, match="mode must be one of"):
        masked_diffusion_loss_from_model(model, ids, mask_id=MASK, mode="antithetic", **kw)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0))
    with pytest.raises(ValueError, match="encoder-decoder"):
        find_backbone(t5)


# --- bidirectional attention ---------------------------------------------------------------------


def _first_position_sees_last(model, attention=None):
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    other = ids.clone()
    other[0, -1] = 6
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=attention).logits[0, 0]
        b = model(input_ids=other, attention_mask=attention).logits[0, 0]
    return not torch.allclose(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", [llama, gpt2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_make_bidirectional(arch, attn):
    model = arch(attn_implementation=attn).eval()
    assert not _first_position_sees_last(model)
    assert make_bidirectional(model) is model
    assert _first_position_sees_last(model)
    # padding stays masked: a padded last token is invisible again
    assert not _first_position_sees_last(model, torch.tensor([[1, 1, 1, 1, 0]]))


class HardCausal(nn.Module):
    """A model whose causal structure (a cumulative sum) ignores every flag."""

    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig()
        self.emb = nn.Embedding(8, 4)

    def forward(self, input_ids, attention_mask=None):
        return types.SimpleNamespace(logits=self.emb(input_ids).cumsum(1))


def test_make_bidirectional_refuses_a_hard_coded_causal_model():
    with pytest.raises(ValueError, match="HardCausal still attends causally"):
        make_bidirectional(HardCausal())


# --- sampling over the global batch --------------------------------------------------------------


def test_rank_and_micro_batch_slices_are_the_global_draw(gen):
    # 2 ranks x 2 micro-batches x 3 sequences: each call's t's are its slice of one global stratified draw,
    # and every (rank, micro-batch) gets its own masks.
    model = llama()
    sampler, seed, B = mdm.Stratified(), 1234, 3
    t_global, w_global = sampler.sample_global(12, seed)
    ids, _, _ = batch(gen, B=B)
    with torch.no_grad():
        for rank in range(2):
            for micro in range(2):
                _, out = masked_diffusion_loss_from_model(model, ids, mask_id=MASK, seed=seed, sampler=sampler,
                                                          rank=rank, world_size=2, micro_batch=micro,
                                                          num_micro_batches=2, return_outputs=True)
                k = (rank * 2 + micro) * B
                assert torch.equal(out.t, t_global[k:k + B]) and torch.equal(out.weight, w_global[k:k + B])
        # With (almost) the same t everywhere, different masks can only come from different mask seeds.
        masks = set()
        for rank in range(2):
            for micro in range(2):
                _, out = masked_diffusion_loss_from_model(model, ids, mask_id=MASK, seed=seed,
                                                          sampler=mdm.Clipped(0.5, 0.5 + 1e-6), rank=rank,
                                                          world_size=2, micro_batch=micro, num_micro_batches=2,
                                                          return_outputs=True)
                masks.add(tuple(out.masked.masked.flatten().tolist()))
    assert len(masks) == 4


# --- memory --------------------------------------------------------------------------------------


def _peak_bytes(fn) -> int:
    """Peak CPU bytes allocated while fn runs, from the profiler's per-op memory records (an op's
    allocations counted at its start, its frees at its end: an upper bound at op granularity)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for e in prof.events():
        d = e.self_cpu_memory_usage
        if d:
            deltas.append((e.time_range.start if d > 0 else e.time_range.end, -d, d))
    current = peak = 0
    for _, _, d in sorted(deltas):
        current += d
        peak = max(peak, current)
    return peak


def test_one_step_uses_less_memory_than_the_full_logits(gen):
    # V = 8192, 4 x 64 tokens: the float32 logits are 8 MiB; the full-logits step holds them, their log-softmax
    # and their gradient. The fused step holds the masked tokens' logits only (or chunk_size of them) plus the
    # parameter gradients (2 MiB). Loose checks; the numbers are printed.
    vocab = 8192
    model = llama(vocab=vocab)
    ids = torch.randint(0, vocab - 1, (4, 64), generator=gen)
    kw = dict(mask_id=vocab - 1, seed=5, sampler=mdm.Clipped(0.4, 0.6))

    def fused(**extra):
        masked_diffusion_loss_from_model(model, ids, **kw, **extra).backward()

    def full():
        masked = mdm.mask_tokens(ids, 0.5, 5, mask_id=vocab - 1)
        logits = model(input_ids=masked.noisy_ids).logits
        ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        (masked.weights * ce).sum().div(ids.numel()).backward()

    peaks = {}
    for name, step in (("full logits", full), ("fused", fused), ("fused, chunk_size=32", lambda: fused(chunk_size=32))):
        step()  # warm-up: lazy initialisation out of the measurement
        model.zero_grad(set_to_none=True)
        peaks[name] = _peak_bytes(step)
        model.zero_grad(set_to_none=True)
    print("peak MiB per step:", {k: round(v / 2**20, 2) for k, v in peaks.items()})
    assert peaks["fused"] < 0.6 * peaks["full logits"]
    assert peaks["fused, chunk_size=32"] < 0.3 * peaks["full logits"]


# --- the Trainer ---------------------------------------------------------------------------------


class ToyDataset(torch.utils.data.Dataset):
    """Arithmetic progressions mod 63 (learnable); a 2-token prompt (labels -100) and some padding."""

    def __init__(self, n, L=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, MASK, (n, 1), generator=g)
        step = torch.randint(0, 2, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(L)) % MASK
        self.pad = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i].clone()
        attention = torch.ones_like(ids)
        if self.pad[i]:
            attention[-int(self.pad[i]):] = 0
        labels = ids.clone()
        labels[:2] = -100
        labels[attention == 0] = -100
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}


class Recorder(transformers.TrainerCallback):
    def __init__(self):
        self.first_step_grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.first_step_grads = grads(model)


def _trainer(tmp_path, model, *, steps, lr=1e-3, schedule="linear", **kw):
    pytest.importorskip("accelerate")  # transformers.Trainer needs it
    from diffkernels.integrations.transformers import MaskedDiffusionTrainer

    class Spy(MaskedDiffusionTrainer):
        """Records what each training micro-batch saw."""

        seen = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, True, num_items_in_batch)
            if self._mdm_training:
                self.seen.append((self.state.global_step, self._mdm_micro_batch, dict(inputs), out.t,
                                  num_items_in_batch))
            return (loss, out) if return_outputs else loss

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=4,
        per_device_eval_batch_size=8, gradient_accumulation_steps=2, max_steps=steps, learning_rate=lr,
        lr_scheduler_type=schedule, max_grad_norm=0.0, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True)
    recorder = Recorder()
    trainer = Spy(model=model, args=args, train_dataset=ToyDataset(64), eval_dataset=ToyDataset(16, seed=1),
                  callbacks=[recorder], mask_id=MASK, seed=99, **kw)
    trainer.seen = []
    return trainer, recorder


@pytest.mark.parametrize("normalizer", ["row", "global"])
def test_trainer_step_is_the_accumulated_micro_batch_losses(tmp_path, normalizer):
    # The first optimizer step's gradient equals the gradient computed by hand from the same two micro-batches:
    # seeds fold_seed(seed, step), micro-batch i of 2 of the stratified global draw, and the accumulation
    # scaling (mean over micro-batches for "row"; one token count for the whole step for "global").
    torch.manual_seed(0)
    model = llama()
    make_bidirectional(model)
    initial = copy.deepcopy(model)
    sampler = mdm.Stratified()
    trainer, recorder = _trainer(tmp_path, model, steps=1, sampler=sampler, normalizer=normalizer)
    trainer.train()
    seen = trainer.seen
    assert [(s, i) for s, i, *_ in seen] == [(0, 0), (0, 1)]
    step_seed = fold_seed(99, 0)
    t_global, _ = sampler.sample_global(8, step_seed)
    for _, i, _, t, _ in seen:
        assert torch.equal(t, t_global[4 * i:4 * i + 4])

    def eligible(inputs):
        return (inputs["labels"] != -100) & (inputs["attention_mask"] != 0)

    tokens = sum(int(eligible(inputs).sum()) for _, _, inputs, _, _ in seen)
    if normalizer == "global":
        assert all(int(n) == tokens for *_, n in seen)  # what get_batch_samples passed as num_items_in_batch
        loss_kw = {"normalizer": "global", "num_tokens": tokens}
    else:
        loss_kw = {"normalizer": "row"}
    for _, i, inputs, _, _ in seen:
        loss = masked_diffusion_loss_from_model(
            initial, inputs["input_ids"], mask_id=MASK, seed=step_seed, sampler=sampler,
            eligible=eligible(inputs), attention_mask=inputs["attention_mask"], micro_batch=i, num_micro_batches=2,
            **loss_kw)
        (loss / 2 if normalizer == "row" else loss).backward()
    expected = grads(initial)
    got = recorder.first_step_grads
    assert got.keys() == expected.keys()
    for name, g in expected.items():  # same float32 computation, same order: equal to rounding
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))


def test_trainer_trains_and_evaluates_reproducibly(tmp_path):
    torch.manual_seed(0)
    model = llama()
    make_bidirectional(model)
    trainer, _ = _trainer(tmp_path, model, steps=8, lr=1e-2, schedule="constant", sampler=mdm.Stratified(),
                          mode="mirror")
    first_eval = trainer.evaluate()["eval_loss"]
    assert first_eval == trainer.evaluate()["eval_loss"]  # evaluation draws the same t's and masks
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    # The 1/t-weighted training losses are noisy; the evaluation loss (same draws each time) is not.
    # These seeds give 4.30 -> 4.08.
    assert trainer.evaluate()["eval_loss"] < first_eval - 0.05
    # compute_loss returns (loss, outputs) when asked
    inputs = trainer._prepare_inputs(transformers.default_data_collator([trainer.eval_dataset[i] for i in range(2)]))
    loss, out = trainer.compute_loss(trainer.model, inputs, return_outputs=True)
    assert loss.dim() == 0 and out.t.shape == (2,) and out.masked.noisy_ids.shape == (4, 12)


def test_trainer_rejects_shifted_labels_and_bad_arguments(tmp_path):
    from diffkernels.integrations.transformers import MaskedDiffusionTrainer

    trainer, _ = _trainer(tmp_path, llama(), steps=1)
    item = trainer.train_dataset[0]
    shifted = dict(item, labels=torch.cat([item["labels"][1:], torch.tensor([-100])]))
    inputs = transformers.default_data_collator([shifted])
    with pytest.raises(ValueError, match="labels must equal input_ids"):
        trainer.compute_loss(trainer.model, inputs)
    args = trainer.args
    with pytest.raises(ValueError, match="normalizer must be one of"):
        MaskedDiffusionTrainer(model=llama(), args=args, mask_id=MASK, normalizer="tokens")
    with pytest.raises(ValueError, match="loss_kwargs must not contain 'num_tokens'"):
        MaskedDiffusionTrainer(model=llama(), args=args, mask_id=MASK, loss_kwargs={"num_tokens": 3})
    with pytest.raises(TypeError, match="sampler must be"):
        MaskedDiffusionTrainer(model=llama(), args=args, mask_id=MASK, sampler="stratified")


def test_through_distributed_data_parallel(tmp_path, gen):
    # The forward goes through the DDP wrapper (its hooks see the step) and the head is found inside it;
    # two steps, because DDP reports parameters that got no gradient at the next step's forward.
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = llama()
        plain = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        forwards = []
        ddp.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(1), with_kwargs=True)
        ids, attention, eligible = batch(gen)
        kw = dict(mask_id=MASK, sampler=mdm.Stratified(), attention_mask=attention, eligible=eligible)
        for seed in (1, 2):
            ddp.zero_grad(set_to_none=True)
            plain.zero_grad(set_to_none=True)
            masked_diffusion_loss_from_model(ddp, ids, seed=seed, **kw).backward()
            masked_diffusion_loss_from_model(plain, ids, seed=seed, **kw).backward()
            expected = grads(plain)
            for name, g in grads(model).items():
                torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-7)
        assert len(forwards) == 2
    finally:
        dist.destroy_process_group()
