"""The ``transformers.Trainer`` for masked diffusion LM training: :class:`MaskedDiffusionTrainer`.

Its public name is ``diffkernels.integrations.transformers.MaskedDiffusionTrainer``; this module holds it
apart from the loss function because it subclasses ``transformers.Trainer`` (which needs transformers and
accelerate), so the class is built on first access and the loss works with any model without them.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .. import mdm
from ..rng import fold_seed
from .transformers import _EVAL_STREAM, IGNORE_INDEX, masked_diffusion_loss_from_model

__all__ = ["MaskedDiffusionTrainer"]


def _trainer_base():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is installed in the test environment
        raise ImportError("MaskedDiffusionTrainer needs the transformers library (and accelerate): "
                          "pip install diffkernels[transformers]") from exc
    return transformers.Trainer


def _eligible_tokens(input_ids: Tensor, labels: Optional[Tensor], attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """Which tokens may be masked: labels != -100 (prompt and padding excluded by the collator) and
    attention_mask != 0; None (all) when neither is given."""
    eligible = None
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
            raise ValueError(f"labels must be shaped like input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
        eligible = labels != IGNORE_INDEX
        if bool((eligible & (labels != input_ids)).any()):
            raise ValueError("labels must equal input_ids wherever they are not -100: a masked diffusion LM "
                             "predicts each token at its own position, so labels only mark which tokens get a "
                             "loss (do not shift them)")
    if attention_mask is not None:
        attending = attention_mask != 0
        eligible = attending if eligible is None else eligible & attending
    return eligible


def _make_trainer_class():
    Trainer = _trainer_base()
    if not hasattr(Trainer, "loss_is_scaled_for_ga"):  # how this Trainer tells it the loss's scaling
        raise ImportError("MaskedDiffusionTrainer needs a transformers Trainer with loss_is_scaled_for_ga "
                          "(transformers 5): pip install -U diffkernels[transformers]")

    class MaskedDiffusionTrainer(Trainer):
        """A ``transformers.Trainer`` that trains masked diffusion: ``compute_loss`` is
        :func:`masked_diffusion_loss_from_model`; everything else (optimizer, schedule, gradient
        accumulation, mixed precision, DDP, checkpoints, logging) is the Trainer's.

        Arguments (keyword-only, besides the Trainer's): ``mask_id`` (the [MASK] token id), ``sampler``
        (default ``mdm.Uniform()``), ``mode`` ("standard" or "mirror"), ``seed`` (default 0), ``eps``,
        ``importance``, ``normalizer`` ("row", "batch" or "global"), ``mask_kwargs``, ``loss_kwargs``
        (``row_clamp``, ``chunk_size``) and ``backbone``, as in :func:`masked_diffusion_loss_from_model`.

        Batches are dicts with ``input_ids`` (the clean tokens, also the targets) and optionally
        ``attention_mask`` and ``labels``; tokens are masked where ``labels != -100`` and
        ``attention_mask != 0`` (so an SFT collator that sets the prompt's labels to -100 keeps the prompt
        clean), and ``labels`` must equal ``input_ids`` elsewhere. Other keys are passed to the model.

        Seeds: optimizer step s uses ``fold_seed(seed, s)`` on every process; micro-batch i of the step
        (its index within the gradient accumulation) on process r draws its slice
        ``r * num_micro_batches + i`` of the step's global batch of t's, and its masks from
        ``fold_seed(fold_seed(seed, s), <mask stream>, r, i)``. Resuming from a checkpoint repeats the
        same draws. Evaluation batch j of each evaluation uses ``fold_seed(seed, <eval stream>, j)``, so
        every evaluation sees the same t's and masks.

        Normalisation: ``"row"`` and ``"batch"`` give each micro-batch's mean loss, which the Trainer
        divides by the number of accumulated micro-batches. ``"global"`` divides by the eligible tokens of
        the whole optimizer step, counted over its micro-batches (and summed over processes when
        ``average_tokens_across_devices``, with the loss multiplied by the world size to undo DDP's
        gradient average, as the Trainer does); that count is what this Trainer passes as
        ``num_items_in_batch``. A short last micro-batch keeps every t unbiased but its step is not exactly
        stratified. ``compute_loss(..., return_outputs=True)`` returns ``(loss, MaskedDiffusionOutput)``;
        evaluation predictions are the (t, weight) pairs, shape (B, 2).
        """

        def __init__(self, *args, mask_id: int, sampler: Optional[mdm.TimeSampler] = None, mode: str = "standard",
                     seed: int = 0, eps: float = 1e-3, importance: bool = True, normalizer: str = "row",
                     mask_kwargs: Optional[dict] = None, loss_kwargs: Optional[dict] = None,
                     backbone: Optional[nn.Module] = None, **kwargs):
            sampler = mdm.Uniform() if sampler is None else sampler
            if not isinstance(sampler, mdm.TimeSampler):
                raise TypeError(f"sampler must be a diffkernels.mdm TimeSampler, got {type(sampler).__name__}")
            if isinstance(mask_id, bool) or not isinstance(mask_id, numbers.Integral) or mask_id < 0:
                raise ValueError(f"mask_id must be a non-negative token id, got {mask_id!r}")
            if mode not in mdm.masking.MODES:
                raise ValueError(f"mode must be one of {mdm.masking.MODES}, got {mode!r}")
            if normalizer not in mdm.loss.NORMALIZERS:
                raise ValueError(f"normalizer must be one of {mdm.loss.NORMALIZERS}, got {normalizer!r}")
            fold_seed(seed)  # checks the seed's type
            loss_kwargs = dict(loss_kwargs or {})
            for name in ("normalizer", "num_tokens"):
                if name in loss_kwargs:
                    raise ValueError(f"loss_kwargs must not contain {name!r}: the Trainer sets it "
                                     "(use the normalizer argument)")
            super().__init__(*args, **kwargs)
            self.mdm_mask_id = int(mask_id)
            self.mdm_sampler = sampler
            self.mdm_mode = mode
            self.mdm_seed = seed
            self.mdm_eps = eps
            self.mdm_importance = importance
            self.mdm_normalizer = normalizer
            self.mdm_mask_kwargs = dict(mask_kwargs or {})
            self.mdm_loss_kwargs = loss_kwargs
            self.mdm_backbone = backbone
            # "global" is normalised over the whole optimizer step already; the others are per micro-batch.
            self.loss_is_scaled_for_ga = normalizer == "global"
            self._mdm_step = None  # the optimizer step the micro-batch counter belongs to
            self._mdm_micro_batch = 0
            self._mdm_training = False
            self._mdm_eval_batch = 0

        # -- which micro-batch of which step ---------------------------------------------------------

        def training_step(self, model, inputs, *args, **kwargs):
            step = self.state.global_step
            if step != self._mdm_step:
                self._mdm_step, self._mdm_micro_batch = step, 0
            else:
                self._mdm_micro_batch += 1
            self._mdm_training = True
            try:
                return super().training_step(model, inputs, *args, **kwargs)
            finally:
                self._mdm_training = False

        def evaluation_loop(self, *args, **kwargs):
            self._mdm_eval_batch = 0  # every evaluation draws the same t's and masks
            return super().evaluation_loop(*args, **kwargs)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            if self.mdm_normalizer != "global":
                return batch_samples, num_items
            count = 0
            for batch in batch_samples:
                ids = batch["input_ids"]
                eligible = _eligible_tokens(ids, batch.get("labels"), batch.get("attention_mask"))
                count += int(eligible.sum()) if eligible is not None else ids.numel()
            count = torch.tensor(count, dtype=torch.int64, device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
            return batch_samples, count

        # -- the loss --------------------------------------------------------------------------------

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            if "input_ids" not in inputs:
                raise ValueError(f"MaskedDiffusionTrainer needs batches with input_ids, got keys {sorted(inputs)}")
            input_ids = inputs.pop("input_ids")
            labels = inputs.pop("labels", None)
            attention_mask = inputs.pop("attention_mask", None)
            if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
                raise ValueError("MaskedDiffusionTrainer needs a (B, L) attention_mask (or none)")
            eligible = _eligible_tokens(input_ids, labels, attention_mask)
            rank, world = self.args.process_index, self.args.world_size
            loss_kwargs = dict(self.mdm_loss_kwargs, normalizer=self.mdm_normalizer)
            if self._mdm_training:
                seed = fold_seed(self.mdm_seed, self.state.global_step)
                micro, num_micro = self._mdm_micro_batch, getattr(self, "current_gradient_accumulation_steps", None)
                num_micro = num_micro or self.args.gradient_accumulation_steps
                if micro >= num_micro:
                    raise RuntimeError(f"training_step ran {micro + 1} times in an optimizer step of {num_micro} "
                                       "micro-batches")
                if self.mdm_normalizer == "global":
                    if num_items_in_batch is None:
                        raise RuntimeError("normalizer='global' needs the step's token count, which "
                                           "MaskedDiffusionTrainer.get_batch_samples passes as num_items_in_batch")
                    loss_kwargs["num_tokens"] = float(num_items_in_batch)
            else:
                seed = fold_seed(self.mdm_seed, _EVAL_STREAM, self._mdm_eval_batch)
                self._mdm_eval_batch += 1
                micro, num_micro = 0, 1
                if self.mdm_normalizer == "global":  # evaluation: this batch's own token average
                    count = int(eligible.sum()) if eligible is not None else input_ids.numel()
                    loss_kwargs["num_tokens"] = float(max(count, 1))
            loss, outputs = masked_diffusion_loss_from_model(
                model, input_ids, mask_id=self.mdm_mask_id, seed=seed, sampler=self.mdm_sampler, mode=self.mdm_mode,
                eligible=eligible, importance=self.mdm_importance, attention_mask=attention_mask, rank=rank,
                world_size=world, micro_batch=micro, num_micro_batches=num_micro, eps=self.mdm_eps,
                mask_kwargs=self.mdm_mask_kwargs, model_kwargs=inputs, backbone=self.mdm_backbone,
                return_outputs=True, **loss_kwargs)
            if (self._mdm_training and self.mdm_normalizer == "global" and self.args.average_tokens_across_devices
                    and world > 1):
                loss = loss * world  # DDP averages gradients over processes; the count already sums them
            return (loss, outputs) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            labels = inputs.get("labels")
            with torch.no_grad(), self.compute_loss_context_manager():
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
            loss = loss.detach()
            if prediction_loss_only:
                return loss, None, None
            return loss, torch.stack([outputs.t, outputs.weight], dim=1), labels

    # Its public home is diffkernels.integrations.transformers: importable by that name, e.g. for pickle.
    MaskedDiffusionTrainer.__module__ = "diffkernels.integrations.transformers"
    MaskedDiffusionTrainer.__qualname__ = "MaskedDiffusionTrainer"
    return MaskedDiffusionTrainer


def __getattr__(name: str) -> Any:
    if name == "MaskedDiffusionTrainer":
        cls = _make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
