"""MegatronNevaModel's training side (a mixin of it, kept with the rest of the step in training/): forward,
the per-token loss, the megatron-core training and validation steps driven from Lightning, MFU logging and the
optimizer / LR schedule."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from nemo_neva.modules.precision import fp8_format
from nemo_neva.training.optimizer import build_megatron_ddp
from nemo_neva.training.schedule import run_forward_backward
from nemo_neva.training import megatron_step as mt

log = logging.getLogger(__name__)

# LR schedule length when the model is trained without a Lightning trainer (tests, benchmarks)
_NO_TRAINER_SCHEDULE_STEPS = 1000


@dataclass
class StepState:
    """What the training side keeps between Lightning's hooks (one per model, `NevaStepMixin.step_state`)."""

    ddp: Optional[list] = None  # [megatron-core DDP]: built by configure_optimizers, or by a validation before it
    val_sums: Optional[torch.Tensor] = None  # [loss sum, loss tokens] of the validation epoch so far
    step_flops: Optional[Callable] = None  # (batch size, sequence, images) -> model FLOPs of a step (perf.mfu)
    peak_flops: Optional[float] = None  # this device's peak FLOP/s (perf.mfu)


class NevaStepMixin:
    """Forward, loss, training / validation steps and optimisation of MegatronNevaModel (a mixin of it).

    Its state lives in `step_state` (StepState); `packed_thd` (default True) chooses THD for packed rows."""

    step_state: StepState
    packed_thd: bool = True

    # ------------------------------------------------------------------ forward / loss
    def forward(self, tokens, position_ids, images=None, attention_mask=None, labels=None):
        return self.model(tokens, position_ids, attention_mask=attention_mask, images=images, labels=labels)

    def _thd(self, batch) -> bool:
        """Packed rows go to the attention as THD + PackedSeqParams (cu_seqlens): TE's causal kernels
        ignore a dense mask, so packed samples would attend to each other, and the local spec's
        SDPACoreAttention then attends per sample, quadratic in each sample's length rather than the row's
        (so packing into long rows pays off on CPU too). `model.packed_thd = False` makes the local spec take
        the block-diagonal mask instead (tests compare the two)."""
        return batch.get("segment_ids") is not None and self.packed_thd

    def _packed_layout(self, mb: dict) -> dict:
        """THD for packed micro-batches. On the local spec with one pipeline stage and no sequence parallelism
        the rows' padding is left out as well (`to_thd(drop_padding=True)`): pipeline stages exchange
        fixed-shape activations and SP splits the sequence evenly over TP ranks, so those keep it, and so
        does TE (not measured here)."""
        if not self._thd(mb):
            return mb
        from nemo_neva.data.packing import to_thd

        cfg = self.cfg
        drop = (mb.get("row_tokens") is not None and not cfg.get("transformer_engine", False)
                and cfg.get("pipeline_model_parallel_size", 1) == 1 and not cfg.get("sequence_parallel", False))
        return to_thd(mb, drop_padding=drop)

    def _pad_for_layout(self, batch: dict) -> dict:
        """The batch lengthened (loss-free padding) to what sequence parallelism and FP8 need
        (`megatron_step.sequence_multiple`): collated batches are as long as their longest sample."""
        cfg = self.cfg
        multiple = mt.sequence_multiple(cfg.get("tensor_model_parallel_size", 1), cfg.get("sequence_parallel", False),
                                        fp8_format(cfg) is not None)
        return mt.pad_sequence_to_multiple(batch, multiple, self.tokenizer.pad_token_id or 0)

    def loss_from_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked mean next-token loss, loss tokens) of a whole batch in one forward on this process, laid out
        as the training step lays out a micro-batch (`_micro_batch_loss`); a batch with no loss token gives a
        finite 0. The training and validation steps run the same forward through megatron-core's schedule."""
        batch = self._packed_layout(self._pad_for_layout(batch))
        total, tokens = mt.masked_loss_sum(self._micro_batch_loss(self.model, batch), batch["loss_mask"])
        return total / tokens.clamp(min=1), tokens

    @staticmethod
    def _micro_batch_loss(model, mb: dict) -> torch.Tensor:
        """Per-token loss [b, s] of a laid-out micro-batch through `model` (the NevaModule, or DDP around it)."""
        return model(mb["tokens"], mb["position_ids"], attention_mask=mb.get("attention_mask"),
                     images=mb.get("images"), labels=mb["labels"], num_images=mb.get("num_images"),
                     packed_seq_params=mb.get("packed_seq_params"), image_sizes=mb.get("image_sizes"),
                     video_frames=mb.get("video_frames"))

    def _forward_step(self, data_iterator, model):
        """megatron-core forward_step_func: one micro-batch -> (output, loss_func)."""
        mb = self._packed_layout(next(data_iterator))
        output = self._micro_batch_loss(model, mb)

        def loss_func(per_token):
            # megatron-core's per-token path (config.calculate_per_token_loss, set with the DDP): the sum and
            # the token count; the schedule and finalize_model_grads divide by the global batch's tokens
            total, tokens = mt.masked_loss_sum(per_token, mb["loss_mask"])
            return total, tokens, {"loss": torch.stack([total.detach(), tokens.detach().float()])}

        return output, loss_func

    def _run_batch(self, batch, forward_only: bool) -> torch.Tensor:
        """One schedule pass over a data-parallel rank's batch -> [loss sum, loss tokens] of the global batch
        (every rank's micro-batches). Evaluation fills a last partial micro-batch with loss-free rows."""
        state = self.step_state
        if state.ddp is None:  # validation before any training (trainer.validate): wrap without an optimizer,
            # outside Lightning's inference mode (DDP hooks the parameters' autograd and allocates grad buffers)
            with torch.inference_mode(False), torch.enable_grad():
                state.ddp = [build_megatron_ddp(self.model, {"calculate_per_token_loss": True})]
        batch = self._pad_for_layout(batch)
        microbatches = mt.split_microbatches(batch, self.cfg.micro_batch_size, pad=forward_only)
        seq, mbs = batch["tokens"].shape[1], self.cfg.micro_batch_size
        if self._thd(batch):
            seq, mbs = seq * mbs, 1  # THD: pipeline stages exchange [mbs*S, 1, H]
        losses = run_forward_backward(state.ddp, iter(microbatches), self._forward_step, len(microbatches),
                                      seq_length=seq, micro_batch_size=mbs, forward_only=forward_only)
        return mt.reduce_loss_sums(losses)

    def forward_backward(self, batch) -> torch.Tensor:
        """Gradients of a data-parallel rank's batch, reduced over the data-parallel ranks (megatron-core DDP
        main_grad), without the optimizer step; returns the global batch's per-token mean loss."""
        self.step_state.ddp[0].zero_grad_buffer()
        return mt.per_token_mean(self._run_batch(batch, forward_only=False))

    def train_on_batch(self, batch, optimizer) -> torch.Tensor:
        """One optimizer step on a data-parallel rank's batch (split into micro-batches). The loss (returned,
        logged as `train_loss`) and its gradients are the mean over every loss token of the global batch."""
        optimizer.zero_grad()
        loss = self.forward_backward(batch)
        optimizer.step()
        return loss

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        start = time.perf_counter()
        loss = self.train_on_batch(batch, opt)
        elapsed = time.perf_counter() - start
        # packed tar shards: the checkpointed position is the trained batches', not the prefetched ones'
        mark_trained = getattr(self._train_dl, "mark_trained", None)  # only the packed-shard loaders have it
        if callable(mark_trained):
            mark_trained()
        bs = batch["tokens"].shape[0]
        adapter = opt.optimizer
        self.log("train_loss", loss, prog_bar=True, batch_size=bs)
        self.log("lr", float(adapter.param_groups[0]["lr"]), batch_size=bs)
        if adapter.last_grad_norm is not None:
            self.log("grad_norm", float(adapter.last_grad_norm), batch_size=bs)
        self.log("tokens_per_sec", batch["tokens"].numel() / max(elapsed, 1e-9), prog_bar=True, batch_size=bs)
        self.log("step_time", elapsed, batch_size=bs)
        self._log_data_skips(batch, bs)
        self._log_mfu(batch, elapsed, bs)
        if torch.cuda.is_available():  # read by scripts/gpu_smoke.sh
            self.log("peak_mem_gib", torch.cuda.max_memory_allocated() / 2**30, batch_size=bs)
        return loss

    def _log_mfu(self, batch, elapsed: float, bs: int) -> None:
        """Model FLOPs/s of this device and their share of its peak (nemo_neva.perf.mfu says how both are got)."""
        from nemo_neva.perf import mfu

        state = self.step_state
        if state.step_flops is None:
            state.step_flops = mfu.step_flops_for(self)
            precision = mfu.training_precision(self.trainer.precision, self.cfg.get("fp8"))
            state.peak_flops, source = mfu.resolve_peak(self.cfg.get("peak_tflops"), precision,
                                                        self.trainer.strategy.root_device)
            log.info("MFU: peak %.1f TFLOP/s per device (%s)", state.peak_flops / 1e12, source)
        images = int(batch["num_images"].sum()) if "num_images" in batch else 0
        flops = state.step_flops(bs, batch["tokens"].shape[1], images) / max(elapsed, 1e-9)
        self.log("model_tflops_per_sec", flops / 1e12, batch_size=bs)
        self.log("mfu", flops / state.peak_flops, batch_size=bs)

    def on_validation_epoch_start(self):
        self.step_state.val_sums = None

    def validation_step(self, batch, batch_idx):
        sums = self._run_batch(batch, forward_only=True)
        previous = self.step_state.val_sums
        self.step_state.val_sums = sums if previous is None else previous + sums
        return mt.per_token_mean(sums)

    def on_validation_epoch_end(self):
        """`val_loss`: the mean over every loss token of the whole validation set (all batches and ranks, the
        last partial batch included), as `train_loss` is over a global batch."""
        sums = self.step_state.val_sums
        if sums is not None:
            self.log("val_loss", mt.per_token_mean(sums), prog_bar=True)
        self.step_state.val_sums = None

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """megatron-core DDP + optimizer + LR schedule (nemo_neva.training.megatron_step.build_training)."""
        ddp, optimizer = mt.build_training(self.model, self.cfg.optim, self._schedule_steps())
        self.step_state.ddp = [ddp]  # not a module attribute: the wrapper is no second copy of the weights
        return optimizer

    def _schedule_steps(self) -> int:
        """Optimizer steps the LR schedule decays over: `model.optim.sched.max_steps` when set, else the steps
        the trainer will run (`trainer.max_steps`, or `trainer.max_epochs` x optimizer steps per epoch, one per
        training batch, whichever ends first). A run with neither bound is refused."""
        sched = self.cfg.optim.get("sched") or {}
        if sched.get("max_steps"):
            return int(sched.get("max_steps"))
        trainer = self._trainer
        if trainer is None:  # building an optimizer outside a trainer (tests, benchmarks): no run to fit
            log.info("no trainer: the LR schedule decays over %d steps (set model.optim.sched.max_steps)",
                     _NO_TRAINER_SCHEDULE_STEPS)
            return _NO_TRAINER_SCHEDULE_STEPS
        return mt.schedule_steps(trainer)
