"""Masked diffusion LM training for Hugging Face transformers models, without the (tokens x vocabulary) logits.

:func:`masked_diffusion_loss_from_model` turns any model with an output-embedding head (``LlamaForCausalLM``,
``GPT2LMHeadModel``, ``Qwen2ForCausalLM``, ...) into a masked diffusion LM loss: it samples a masking rate t
per sequence with a :mod:`diffkernels.mdm` sampler, masks tokens with :func:`~diffkernels.mdm.mask_tokens`,
runs the model on the noisy ids and computes :func:`~diffkernels.mdm.masked_diffusion_loss` from the hidden
states that enter the LM head and the head's weight (and bias): logits exist only for the masked tokens.
:class:`MaskedDiffusionTrainer` is a ``transformers.Trainer`` whose ``compute_loss`` does this, so a
fine-tuning script switches to masked diffusion by changing its Trainer class.

Bidirectional attention. A masked diffusion LM (LLaDA, SMDM) attends in both directions. A decoder-only
architecture built for causal LM attends causally unless told otherwise; :func:`make_bidirectional` tells it
(``config.is_causal = False``, honoured by every architecture that builds its attention mask with
``transformers.masking_utils``, and ``is_causal = False`` on its attention modules for the kernels that read
that flag), then checks with two tiny forward passes that the first position now sees the last. Models that
are bidirectional by construction need nothing. A causal model trained with this loss still learns a valid
denoiser, only a causally restricted one: the prediction for a masked token sees the noisy tokens at and
before its position, never those after it, so its loss (an upper bound of the negative log-likelihood, as
always) stays higher than a bidirectional model's. No labels are shifted in either case: the hidden state at
position l predicts the clean token at position l.

One module on purpose: the loss and the model introspection it rests on (finding the LM head, the
hidden states that enter it, the logit scale, the backbone, the attention's direction) belong together;
the Trainer built on them is in :mod:`diffkernels.integrations.transformers_trainer`.
"""

from __future__ import annotations

import inspect
import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import mdm
from ..rng import fold_seed

__all__ = [
    "MaskedDiffusionOutput",
    "MaskedDiffusionTrainer",
    "find_backbone",
    "make_bidirectional",
    "masked_diffusion_loss_from_model",
]

IGNORE_INDEX = -100  # transformers' label value for tokens without a loss
# Stream tags folded into the seeds (arbitrary constants): masks never reuse the sampler's stream, and
# evaluation never reuses a training step's seeds.
_MASK_STREAM = 0x6D61_736B  # "mask"
_EVAL_STREAM = 0x6576_616C  # "eval"

# Models whose head has been checked against the model's own logits, with what was checked.
_HEAD_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


@dataclass
class MaskedDiffusionOutput:
    """What ``masked_diffusion_loss_from_model(..., return_outputs=True)`` returns with the loss.

    ``t`` (B,) float32: each sequence's sampled masking rate; ``weight`` (B,) float32: the sampler's weight
    (1/p(t) for P-POTS; it multiplies the loss when ``importance=True``); ``masked``: the
    :class:`~diffkernels.mdm.MaskedTokens` the loss was computed on (noisy ids, masks, per-token weights).
    """

    loss: Tensor
    t: Tensor
    weight: Tensor
    masked: mdm.MaskedTokens


# --- finding the pieces of a model ------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel, DeepSpeed or torch.compile wrappers."""
    seen = 0
    while seen < 8:
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if not isinstance(inner, nn.Module):
            inner = model.__dict__.get("_modules", {}).get("module")  # DDP, DeepSpeed engine
        if not isinstance(inner, nn.Module) or callable(getattr(model, "get_output_embeddings", None)):
            return model
        model, seen = inner, seen + 1
    return model


def find_backbone(model: nn.Module) -> nn.Module:
    """The module that maps input ids to the final hidden states: ``model.get_decoder()`` where it is a
    submodule, else ``model.model``, ``model.transformer`` or ``model.base_model``, whichever exists.

    Encoder-decoder models are refused: their decoder needs the encoder's output.
    """
    model = _unwrap(model)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model; masked diffusion needs a single "
                         "stack over the token sequence (a decoder-only or encoder-only model)")
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
        if isinstance(decoder, nn.Module) and decoder is not model:
            return decoder
    for name in ("model", "transformer", "base_model"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module) and sub is not model:
            return sub
    raise ValueError(f"cannot find the backbone of {type(model).__name__}: it has no get_decoder() returning a "
                     "submodule and no .model, .transformer or .base_model; pass backbone= (the module that "
                     "returns the hidden states the LM head reads)")


def _output_head(model: nn.Module) -> tuple[nn.Module, Tensor, Optional[Tensor]]:
    """The LM head module and its weight (V, H) and bias (V,) or None."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() returned "
                         f"{type(head).__name__}); masked diffusion needs a model with an LM head, e.g. "
                         "AutoModelForCausalLM or AutoModelForMaskedLM")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"the output embeddings of {type(model).__name__} ({type(head).__name__}) have no "
                         "floating-point (vocab, hidden) weight; quantized or sharded heads are not supported")
    bias = getattr(head, "bias", None)
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(f"the output embeddings' bias must have shape ({weight.shape[0]},)")
    return head, weight, bias


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _logit_scale(model: nn.Module) -> float:
    """The factor the model applies to the head's output (logits = scale * (h W^T + b)).

    Known linear post-head factors: ``logit_scale`` (Cohere: multiplies), ``logits_scaling`` (Granite:
    divides), ``output_multiplier`` (multiplies). A tanh soft-cap (Gemma 2/3, ...) is not linear in the
    logits: it is refused. With the default head capture the first call also compares the model's own
    logits at one position per row with ``scale * (h W^T + b)``, so a factor this list misses is caught.
    """
    config = getattr(model, "config", None)
    if config is None:
        return 1.0
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    for cfg in (config, text):
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap is not None:
            raise ValueError(
                f"{type(model).__name__} soft-caps its logits (config.final_logit_softcapping={cap}): "
                "cap * tanh(logits / cap) cannot be folded into the fused cross-entropy. Set "
                "model.config.final_logit_softcapping = None to train without the cap, or compute the loss "
                "from the full logits with diffkernels.mdm.masked_diffusion_loss(..., logits=...)")
    scale = 1.0
    multiply = _number(getattr(model, "logit_scale", getattr(text, "logit_scale", None)))
    if multiply is not None:
        scale *= multiply
    divide = _number(getattr(text, "logits_scaling", None))
    if divide is not None:
        if divide == 0:
            raise ValueError("config.logits_scaling must not be 0")
        scale /= divide
    multiply = _number(getattr(text, "output_multiplier", None))
    if multiply is not None:
        scale *= multiply
    if not math.isfinite(scale) or scale == 0:
        raise ValueError(f"the model's logit scale is {scale}; it must be finite and nonzero")
    return scale


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _first_output(out) -> Optional[Tensor]:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    return logits if isinstance(logits, Tensor) else None


def _hidden_via_head(model: nn.Module, inner: nn.Module, head: nn.Module, weight: Tensor, bias: Optional[Tensor],
                     scale: float, model_inputs: dict) -> tuple[Tensor, Optional[torch.dtype]]:
    """Run the full model, capturing the LM head's input and the autocast dtype the head runs under
    (None: no autocast); the head itself sees one position per row.

    Going through the model's own forward (and whatever wraps it, e.g. DistributedDataParallel) runs
    exactly the computation that feeds the head, final norms included. The head's output at the kept
    position is compared with ``scale * (h W^T + b)`` on the first call for this model.
    """
    captured = []

    def keep_one_position(module, args):
        if not args or not isinstance(args[0], Tensor) or args[0].dim() < 2:
            raise ValueError(f"the LM head of {type(inner).__name__} was not called with the hidden states as "
                             "its first positional argument; pass backbone=")
        kind = args[0].device.type
        captured.append((args[0], torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None))
        return (args[0][..., :1, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(keep_one_position)
    try:
        out = model(**model_inputs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"the LM head of {type(inner).__name__} ran {len(captured)} times in one forward pass "
                         "(expected once); pass backbone= (the module whose output the head reads)")
    hidden, autocast_dtype = captured[0]
    key = (id(head), scale)
    if _HEAD_CHECKED.get(inner) != key:
        logits = _first_output(out)
        rows = hidden.shape[0]
        if logits is not None:
            kind = hidden.device.type
            with torch.no_grad(), torch.autocast(kind, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                expected = F.linear(hidden[..., :1, :], weight, bias) * scale
                if logits.shape != expected.shape:
                    raise ValueError(f"{type(inner).__name__} returned logits of shape {tuple(logits.shape)} for "
                                     f"a head output of shape {tuple(expected.shape)}; pass backbone=")
                got, want = logits.float(), expected.float()
                tol = 2 * torch.finfo(logits.dtype).eps * float(want.abs().amax()) + 1e-6
                err = float((got - want).abs().amax())
            if not err <= tol:
                raise ValueError(f"the logits of {type(inner).__name__} are not {scale:g} * (hidden @ W^T + b) of "
                                 f"its LM head (max difference {err:.3g} over {rows} rows): the model transforms "
                                 "them after the head in a way diffkernels does not know; compute the loss "
                                 "from the full logits with diffkernels.mdm.masked_diffusion_loss(logits=...)")
        _HEAD_CHECKED[inner] = key
    return hidden, autocast_dtype


def _hidden_via_backbone(backbone: nn.Module, model_inputs: dict) -> Tensor:
    out = backbone(**model_inputs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, (tuple, list)) and out:
        hidden = out[0]
    if not isinstance(hidden, Tensor):
        raise ValueError(f"the backbone {type(backbone).__name__} returned {type(out).__name__} without a "
                         "last_hidden_state")
    return hidden


# --- the loss ---------------------------------------------------------------------------------------


def masked_diffusion_loss_from_model(
    model: nn.Module,
    input_ids: Tensor,
    *,
    mask_id: int,
    seed: int,
    sampler: mdm.TimeSampler,
    mode: str = "standard",
    eligible: Optional[Tensor] = None,
    importance: bool = True,
    attention_mask: Optional[Tensor] = None,
    rank: int = 0,
    world_size: int = 1,
    micro_batch: int = 0,
    num_micro_batches: int = 1,
    eps: float = 1e-3,
    mask_kwargs: Optional[dict] = None,
    model_kwargs: Optional[dict] = None,
    backbone: Optional[nn.Module] = None,
    return_outputs: bool = False,
    **loss_kwargs,
):
    """The masked diffusion LM loss of ``model`` on ``input_ids`` (B, L), never forming (B*L) x V logits.

    1. t, weight = ``sampler.sample(B, seed, rank=, world_size=, micro_batch=, num_micro_batches=)``: the
       sampler draws the whole global batch from ``seed`` and returns this rank's micro-batch slice, so
       ``Stratified`` and ``PPOTSSampler(stratify=True)`` stratify over the global batch. ``seed`` must be
       the same on every rank and micro-batch of one optimizer step (fold the step into it, not the rank).
    2. Masks: :func:`diffkernels.mdm.mask_tokens` with p = (1 - eps) t + eps, ``mode`` ("standard" or
       "mirror": two antithetic copies of each row, twice the forward work), seed
       ``fold_seed(seed, <mask stream>, rank, micro_batch)``, ``mask_kwargs`` (``rare``, ``rare_delta``,
       ``mirror_max_t``, ``union_weights``). Only ``eligible`` (B, L) bool tokens are ever masked (exclude
       prompts; default all), and never padding where ``attention_mask`` is 0.
    3. The model runs on the noisy ids (with ``attention_mask`` and ``model_kwargs``, rows repeated for the
       mirror copies). By default the forward is the model's own, called as ``model(input_ids=...,
       attention_mask=..., **model_kwargs)`` (through any DDP wrapper), with a hook on the LM head
       (``model.get_output_embeddings()``) that captures its input and lets it compute one position per
       row. With ``backbone`` (a module, e.g. ``find_backbone(model)``) that module is run instead and its
       ``last_hidden_state`` is used: for models whose head is not called as a module in forward.
    4. Loss: :func:`diffkernels.mdm.masked_diffusion_loss` from those hidden states and the head's weight
       and bias, times the sampler's weight when ``importance`` (needed for P-POTS to stay unbiased), with
       ``loss_kwargs`` (``normalizer``, ``num_tokens``, ``row_clamp``, ``chunk_size``). A linear factor the
       model applies to the logits (Cohere's ``logit_scale``, Granite's ``logits_scaling``) is applied; a
       tanh soft-cap (``final_logit_softcapping``) is refused. The first call for a model checks that its
       logits are ``scale * (h W^T + b)`` at the one kept position (default path only).

    The targets are the clean ``input_ids`` at the same positions (no shift). Causal models work but learn
    a causally restricted denoiser; call :func:`make_bidirectional` first for LLaDA-style training. Under
    autocast (around the call, or inside the model's forward as accelerate's mixed precision does) the head
    runs in the autocast dtype, as the model's own head would. Needs the head's full weight outside the
    forward pass (DDP, not FSDP or ZeRO-3). Returns the loss, or ``(loss, MaskedDiffusionOutput)`` with
    ``return_outputs=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.DataParallel):
        raise ValueError("model must not be torch.nn.DataParallel (its replicas cannot share the head hook); "
                         "use DistributedDataParallel")
    if not isinstance(sampler, mdm.TimeSampler):
        raise TypeError(f"sampler must be a diffkernels.mdm TimeSampler (Uniform(), Stratified(), "
                        f"PPOTSSampler...), got {type(sampler).__name__}")
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int32, torch.int64) or input_ids.dim() != 2:
        raise TypeError("input_ids must be a (B, L) int32 or int64 tensor of token ids")
    if not isinstance(importance, bool):
        raise TypeError(f"importance must be a bool, got {type(importance).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) <= 1.0:
        raise ValueError(f"eps must be a float in (0, 1], got {eps!r}")
    if backbone is not None and not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a torch.nn.Module or None, got {type(backbone).__name__}")
    model_kwargs = dict(model_kwargs or {})
    for name in ("input_ids", "attention_mask", "labels", "inputs_embeds"):
        if name in model_kwargs:
            raise ValueError(f"model_kwargs must not contain {name!r} (input_ids and attention_mask are "
                             "arguments of their own; labels and inputs_embeds do not apply)")
    B, L = input_ids.shape
    device = input_ids.device
    if eligible is not None and (not isinstance(eligible, Tensor) or eligible.dtype != torch.bool
                                 or eligible.shape != (B, L)):
        raise ValueError(f"eligible must be a (B, L) = ({B}, {L}) bool tensor")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != (B, L):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must be a (B, L) = ({B}, {L}) tensor, got {got}")
        attending = attention_mask.to(device=device) != 0
        eligible = attending if eligible is None else eligible & attending
    inner = _unwrap(model)
    head, weight, bias = _output_head(inner)
    scale = _logit_scale(inner)
    V = weight.shape[0]
    if isinstance(mask_id, bool) or not isinstance(mask_id, numbers.Integral) or not 0 <= int(mask_id) < V:
        raise ValueError(f"mask_id must be a token id in [0, {V}) (the LM head's vocabulary), got {mask_id!r}")

    t, w = sampler.sample(B, seed, rank=rank, world_size=world_size, micro_batch=micro_batch,
                          num_micro_batches=num_micro_batches, device=device)
    p = (1.0 - float(eps)) * t + float(eps)
    masked = mdm.mask_tokens(input_ids, p, fold_seed(seed, _MASK_STREAM, rank, micro_batch), mask_id=int(mask_id),
                             eligible=eligible, mode=mode, **(mask_kwargs or {}))

    rows = masked.source_row if masked.noisy_ids.shape[0] != B else None
    inputs = {"input_ids": masked.noisy_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask if rows is None else attention_mask[rows]
    for name, value in model_kwargs.items():  # per-row inputs follow the mirror copies
        if rows is not None and isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == B:
            value = value[rows]
        inputs[name] = value
    forward_module = inner if backbone is None else backbone
    if "use_cache" not in inputs and _accepts(forward_module, "use_cache"):
        inputs["use_cache"] = False  # no key/value cache: nothing is generated
    if backbone is None:
        hidden, autocast_dtype = _hidden_via_head(model, inner, head, weight, bias, scale, inputs)
    else:
        hidden = _hidden_via_backbone(backbone, inputs)
        kind = hidden.device.type
        autocast_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    if hidden.shape[:2] != masked.noisy_ids.shape or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"the hidden states have shape {tuple(hidden.shape)}; expected "
                         f"{tuple(masked.noisy_ids.shape) + (weight.shape[1],)} for the LM head")

    if autocast_dtype is not None:  # the head runs in the autocast dtype, as it does in the model's forward
        hidden, weight = hidden.to(autocast_dtype), weight.to(autocast_dtype)
        bias = bias.to(autocast_dtype) if bias is not None else None
    if scale != 1.0:  # scale * (h W^T + b) = (scale h) W^T + scale b
        hidden = hidden * scale
        bias = bias * scale if bias is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        loss = mdm.masked_diffusion_loss(masked, input_ids, hidden=hidden, lm_head_weight=weight, lm_head_bias=bias,
                                         importance=w if importance else None, **loss_kwargs)
    if return_outputs:
        return loss, MaskedDiffusionOutput(loss=loss, t=t, weight=w, masked=masked)
    return loss


# --- bidirectional attention ------------------------------------------------------------------------


def make_bidirectional(model: nn.Module, *, check: bool = True) -> nn.Module:
    """Switch a decoder-only transformers model to bidirectional attention, in place; returns the model.

    Sets ``is_causal = False`` on every config in the model (``transformers.masking_utils`` then builds
    bidirectional masks, padding still masked) and on every submodule that has a boolean ``is_causal``
    (the attention modules: SDPA and flash-attention kernels read that flag when no mask is passed). With
    ``check`` it then verifies, with two forward passes of 4 tokens in eval mode, that the output at the
    first position depends on the last token, and raises a ValueError naming the model class if it does
    not (an architecture that hard-codes its causal mask).
    """
    inner = _unwrap(model)
    configs = {}
    for module in inner.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            configs[id(cfg)] = cfg
            text = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else None
            if text is not None:
                configs[id(text)] = text
        if isinstance(getattr(module, "is_causal", None), bool):
            module.is_causal = False
    if not configs:
        raise ValueError(f"{type(inner).__name__} has no transformers config to switch to bidirectional attention")
    for cfg in configs.values():
        cfg.is_causal = False
    if check:
        _check_bidirectional(inner)
    return model


def _check_bidirectional(model: nn.Module) -> None:
    try:
        param = next(model.parameters())
    except StopIteration:
        raise ValueError("the model has no parameters") from None
    ids = torch.arange(4, device=param.device)[None]
    changed = ids.clone()
    changed[0, -1] = 4
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            first = [_first_output(model(input_ids=x)) for x in (ids, changed)]
    finally:
        for module, training in modes:
            module.training = training
    if first[0] is None or first[1] is None:
        raise ValueError(f"cannot check {type(model).__name__}: its forward returned no logits")
    # A causal model gives the same first position up to rounding; a bidirectional one moves it visibly.
    a, b = first[0][0, 0].float(), first[1][0, 0].float()
    if not float((a - b).abs().amax()) > 1e-5 * float(a.abs().amax()):
        raise ValueError(f"{type(model).__name__} still attends causally after config.is_causal = False: its "
                         "attention does not read that flag; use a bidirectional model (LLaDA-style) or "
                         "train it as a causally restricted denoiser")


def __getattr__(name: str) -> Any:
    # The Trainer subclass needs transformers.Trainer (and accelerate): built on first use, so that the
    # loss function works with any model without importing transformers.
    if name == "MaskedDiffusionTrainer":
        from .transformers_trainer import MaskedDiffusionTrainer as cls

        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
