"""The training loop: one `Trainer`, set up in parts, trained in one method.

In: a validated `TrainingConfig`, the run dir, a tokenizer, the training (and validation) `PreparedData`.
Out: `metrics.jsonl`, `validation.jsonl`, `loss.png`, resumable checkpoints and `final/` in the run dir,
and a `TrainResult`.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from chatft import console
from chatft.config.schema import TrainingConfig
from chatft.data.types import PreparedData, TokenizedRow
from chatft.run_layout import METRICS_FILE, VALIDATION_FILE
from chatft.train import attention, batching, checkpoints, layer_compile, losses, memory, padding_free, recompute
from chatft.train import chunked_head, sharding
from chatft.train.chunked_head import ChunkedHead
from chatft.train.distributed import World, strategy_for
from chatft.train.metrics import JsonlLog, ProgressDisplay
from chatft.train.model import (apply_lora, count_parameters, enable_activation_checkpointing, load_model, lora_targets,
                                model_location, model_skeleton, pick_device, probe_vocab_size, resolve_dtype)
from chatft.train.precision import master_weights_note, precision_for
from chatft.train.optimizer import build_optimizer
from chatft.train.finishing import Finishing, TrainResult
from chatft.train.memory import MB
from chatft.train.resumable import Resumable
from chatft.train.queued_step import PendingRow, QueuedStep, StepClock
from chatft.train.schedule import LRSchedule
from chatft.train.stop_signal import StopFlag

# Devices where a step is queued rather than done when the step method returns: there its loss and gradient
# norm are read only after the next step is queued (`queued_step`). A seam: CPU tests add "cpu".
DEFERRED_READ_DEVICES = ("cuda",)


class Trainer(Resumable, Finishing):
    """Fine-tunes a Hugging Face causal LM on chat rows: every weight (full SFT) or a LoRA adapter.

    - model: `AutoModelForCausalLM.from_pretrained` in `model.torch_dtype` on CUDA if present else CPU;
      LoRA through PEFT with float32 adapters; activation checkpointing when asked;
    - batches: `global_batch_size` rows per optimizer step in micro-batches of `local_batch_size` rows (or
      of up to `packed_sequence_size` tokens), each one padding-free row (the default, after a check that the
      model keeps packed rows apart) or padded to its longest row; optional length grouping; epochs
      reshuffled from the seed;
    - loss head: logits only at positions followed by a supervised token, a chunk of positions at a time
      when the model's decoder and head allow it (`losses.loss_sum`);
    - loss: summed token cross-entropy over supervised tokens divided by the supervised tokens of the whole
      optimizer step, so the result does not depend on how a step is split into micro-batches;
    - nothing in an optimizer step waits for the device: on CUDA a step's loss and gradient norm are read for
      its log row once the next step is queued (`queued_step`);
    - fused AdamW without weight decay on norms and biases; warm-up then cosine / linear /
      constant decay to `min_lr`; gradient clipping;
    - stops at `max_steps` or `num_epochs`, whichever comes first; validation loss and token accuracy
      every `val_every_steps` and at the end;
    - resumable checkpoints every `ckpt_every_steps` (atomic, LATEST, keep_last); SIGTERM/SIGINT finish the
      step and save one; a resumed run repeats an uninterrupted one exactly (CPU, float32);
    - a CUDA out-of-memory becomes `error[oom]` with the advice ladder and the step;
    - `final/`: a `save_pretrained` dir or a PEFT adapter, tokenizer included, with `chatft_manifest.json`.

    Several processes (`World`, started by torchrun): each takes its share of a step's rows, balanced by tokens
    (`batching.step_rows`); the step's supervised tokens, its loss and the validation sums are added across
    processes, and so are the gradients, so a step trains exactly what one process would. Strategy `ddp`: weights
    and optimizer states are replicated and the gradients added once per optimizer step
    (`distributed.World.reduce_gradients`); `fsdp2`: they are split across the processes (`sharding`), each pass
    gathers a layer's weights and reduce-scatters its gradients, and every process runs the same number of passes.
    Rank 0 alone logs; checkpoints are a collective (`resumable`). The places that differ are marked "ranks".
    """

    def __init__(
        self,
        cfg: TrainingConfig,
        run_dir: Path,
        tokenizer: Any,
        train_data: PreparedData,
        val_data: PreparedData | None = None,
        *,
        estimate: memory.MemoryEstimate | None = None,
        resolved_config: dict[str, Any] | None = None,
        resume_command: str | None = None,
        world: World | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.tokenizer = cfg, Path(run_dir), tokenizer
        self.train_data, self.val_data = train_data, val_data
        self.estimate = estimate
        self.resolved_config = resolved_config if resolved_config is not None else cfg.model_dump(mode="json")
        self.resume_command = resume_command
        self.world = world or World()
        self.rank, self.world_size = self.world.rank, self.world.size
        self.is_main = self.world.is_main  # ranks: only rank 0 logs and saves
        self.lora = cfg.peft is not None
        self.strategy = strategy_for(cfg.distributed.strategy, self.world.size, self.lora)
        self.sharded: sharding.Sharded | None = None  # set up with the model when the strategy is fsdp2

    # ------------------------------------------------------------------ setup

    def setup(self, resume_from: Path | None = None, notes: list[str] | None = None) -> None:
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        self.device = pick_device()
        self._clock = StepClock(self.device)  # times steps as the device runs them (`queued_step`)
        self.dtype = resolve_dtype(self.cfg.model.torch_dtype, self.device)
        master_weights = self.cfg.optimizer.master_weights
        self.precision = precision_for(self.dtype, self.lora, master_weights)
        self.recompute = recompute.mode_for(self.cfg.distributed.activation_checkpointing, self.lora, self.device,
                                            compiled=self.cfg.compile.enabled)
        self.notes: list[str] = list(notes or [])
        self.notes.append(master_weights_note(self.dtype, self.lora, master_weights) or "")
        self._setup_model()
        self._setup_optimizer()
        self._setup_data()
        self._setup_logging()
        self._resume(resume_from)
        self._print_summary()

    def _setup_model(self) -> None:
        cfg = self.cfg
        if self.estimate is None:
            self.estimate = memory.estimate_memory(cfg, device=self.device, world_size=self.world_size,
                                                   lengths=memory.row_lengths(self.train_data, self.val_data))
            self.notes.append(memory.check_fits(self.estimate, self.device, cfg.force) or "")
        # FSDP2 loads on the CPU; splitting the model moves each process's shards to its device, so a model that
        # fits only sharded is never whole on one GPU. The probes below run where the model is. Only rank 0 reads
        # the weights: the other processes build the model on the meta device and receive their shards from it.
        self.load_device = torch.device("cpu") if self.strategy == "fsdp2" else self.device
        self.loads_once = self.strategy == "fsdp2" and self.world_size > 1
        if self.loads_once and not self.is_main:
            model = model_skeleton(cfg.model, self.precision.weights)
        else:
            model = load_model(cfg.model, self.load_device, self.precision.weights)
        if self.recompute:
            enable_activation_checkpointing(model, self.recompute)
            self.notes.append(f"activation checkpointing: {recompute.DESCRIPTIONS[self.recompute]}")
        if self.lora:
            targets = lora_targets(model, cfg.peft)
            self.notes.append(targets.describe() or "")  # a mixture of experts: what is adapted, what stays frozen
            model = apply_lora(model, cfg.peft, cfg.seed, targets)
            if self.precision.autocast:
                for module in model.modules():  # autocast matches the dtypes; PEFT's own casts would undo it
                    if isinstance(module, BaseTunerLayer):
                        module.cast_input_dtype_enabled = False
        if not self.loads_once:  # (loaded once, rank 0's weights reach the others as their shards, below)
            self.world.broadcast_trainable(model)  # ranks: every process starts from rank 0's weights
        self.model = model
        self.params = count_parameters(model)
        self.padding_free, self.loss_head = self._probe()
        if self.loss_head is None:
            self.notes.append("note: loss head: the model's own logits at supervised positions (its forward does "
                              "more than decoder + linear head, so the chunked head is not used)")
        if cfg.compile.enabled:  # after the probes: they run rows of other shapes than training's
            self.notes.append(layer_compile.compile_layers(self.model, cfg.compile))
        if self.strategy == "fsdp2":  # after the probes too: they run the decoder outside the sharding root
            full_state = self.model.state_dict() if self.loads_once and self.is_main else None  # before sharding
            self.sharded = sharding.Sharded(self.model, self.world, self.device, self.precision)
            if self.loads_once:
                sharding.fill_from_rank0(self.model, full_state, self.device)
                del full_state
                if not self.is_main:  # into this process's own log (logs/rank_N.log)
                    console.info(f"weights: this process's shards received from rank 0 (rank {self.world.rank} "
                                 "read no weight file)")
            loaded = ("; the weights read by rank 0 alone and sent to each process as its shards"
                      if self.loads_once else "")
            self.notes.append(f"FSDP2: weights, gradients and optimizer states split over {self.world_size} "
                              f"processes in {self.sharded.units} units (each decoder layer, and the rest){loaded}")
        # float16 gradients underflow without loss scaling (`precision`: the trained parameters are float32 then, so
        # their gradients can be unscaled). Disabled, the scaler passes everything through.
        self.scaler = sharding.grad_scaler(self.sharded, self.device, enabled=self.precision.loss_scaling)
        self._loss_scale = self.scaler.get_scale()  # after the last update; the initial one is read without a sync
        self.skipped_steps = 0
        if self.scaler.is_enabled():
            master = "" if self.lora else "float32 master weights computed in float16 under autocast, "
            self.notes.append(f"float16: {master}dynamic loss scaling; a step whose gradients overflow is skipped "
                              "and counted")

    def _probe(self) -> tuple[bool, ChunkedHead | None]:
        """Run the start-up probes on the loaded model: padding-free rows (and the attention they use) and the
        chunked loss head. Loaded once (FSDP2), rank 0 alone has weights to probe: it decides, and the others
        take the same attention and head."""
        if not self.loads_once:
            return self._check_padding_free(), self._find_loss_head()

        def decide() -> tuple[bool, str | None, bool]:
            padding_free = self._check_padding_free()
            return padding_free, attention.implementation(self.model), self._find_loss_head() is not None

        padding_free, implementation, uses_head = self.world.on_main(decide)
        if not self.is_main:
            if implementation == attention.SEGMENT_SDPA:
                attention.use_segment_sdpa(self.model)
            elif implementation is not None and attention.implementation(self.model) != implementation:
                self.model.set_attn_implementation(implementation)
        return padding_free, chunked_head.find_head(self.model) if uses_head else None

    def _find_loss_head(self) -> ChunkedHead | None:
        with self._compute_precision():
            return losses.head_for(self.model, probe_vocab_size(self.tokenizer, self.model), self.load_device)

    def _check_padding_free(self) -> bool:
        """Padding-free micro-batches where asked for and the loaded model keeps them apart (`padding_free`);
        a fall-back to padded ones is estimated and checked again."""
        kept_apart, note = padding_free.choose_layout(
            self.model, self.cfg, probe_vocab_size(self.tokenizer, self.model), self.load_device, self.dtype,
            self._compute_precision)
        self.notes.append(note or "")
        if note:
            loaded = sum(p.numel() * p.element_size() for p in self.model.parameters())
            self.estimate, fit_note = memory.check_padded_fallback(
                self.cfg, self.device, memory.row_lengths(self.train_data, self.val_data), self.estimate, loaded)
            self.notes.append(fit_note or "")
        return kept_apart

    def _micro_batches(self, rows: list) -> list[dict[str, torch.Tensor]]:
        return batching.micro_batches(rows, self.cfg.step_scheduler.local_batch_size, self.pad_id,
                                      padding_free=self.padding_free,
                                      token_budget=self.cfg.packed_sequence.packed_sequence_size)

    def _compute_precision(self):
        """Autocast to the compute dtype where the trained parameters are float32 below it (`precision`)."""
        return self.precision.context(self.device)

    def _setup_optimizer(self) -> None:
        self.optimizer, self.trainable = build_optimizer(self.model, self.cfg.optimizer, self.precision, self.device,
                                                         self.cfg.seed,
                                                         fused=not (self.sharded and self.precision.loss_scaling))

    def _setup_data(self) -> None:
        cfg, sched = self.cfg, self.cfg.step_scheduler
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        self.lengths = [len(row) for row in self.train_data.rows]
        self.steps_per_epoch = batching.steps_per_epoch(len(self.lengths), sched.global_batch_size)
        self.total_steps = self.steps_per_epoch * sched.num_epochs
        if sched.max_steps is not None:
            self.total_steps = min(self.total_steps, sched.max_steps)
        self.schedule = LRSchedule.from_config(cfg.lr_scheduler, cfg.optimizer.lr, self.total_steps)
        self.val_batches = []
        if self.val_data is not None:
            rows = self.val_data.rows[self.rank::self.world_size]  # ranks: each validates its share
            self.val_batches = self._same_count_everywhere(self._micro_batches(rows))
        # The data position: epoch, and optimizer steps taken within it.
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.tokens_seen, self.elapsed_before = 0, 0.0
        self.last_train_loss: float | None = None
        self.last_val: dict[str, Any] | None = None
        self._order_epoch, self._order = -1, []

    def _setup_logging(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = JsonlLog(self.run_dir / METRICS_FILE)
        self.validation_log = JsonlLog(self.run_dir / VALIDATION_FILE)
        # TensorBoard, W&B, MLflow: one writer on rank 0 for the rows below, set by `chatft.trackers.attached_to`
        self.trackers: Any = None

    def _print_summary(self) -> None:
        if not self.is_main:
            return
        cfg, sched = self.cfg, self.cfg.step_scheduler
        mode = f"LoRA r={cfg.peft.dim}" if self.lora else "full SFT"
        validation = f", {len(self.val_data.rows)} validation rows" if self.val_data else ""
        lines = [
            f"model: {model_location(cfg.model)} on {self.device.type} ({mode})",
            self.params.line(),
            f"data: {len(self.lengths)} training rows{validation}",
            f"steps: {self.total_steps} ({self.steps_per_epoch} per epoch) of {sched.global_batch_size} rows; "
            f"{batching.describe_layout(cfg, self.padding_free, attention.implementation(self.model))}",
            *self.estimate.lines(),
            *[n for n in self.notes if n],
        ]
        if self.resumed_from is not None:
            lines.append(f"resuming from {self.resumed_from} (step {self.step})")
        console.info("\n".join(lines))

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        cfg = self.cfg
        started = time.monotonic()
        stop = StopFlag(repeat_is_default=not self.world.distributed)
        display = ProgressDisplay(self.total_steps, self.step) if self.is_main else None
        note = display.note if display else (lambda line: None)
        pending = PendingRow(lambda step: self._log_step(step, note, display),
                             defer=self.device.type in DEFERRED_READ_DEVICES)
        self._origin = self._clock.mark()  # `started` on the device's timeline: rows' elapsed_s count from it
        attention.reset_kernel_use()  # the manifest's attention_kernels are this run's
        saved_at = self.step
        self.model.train()
        try:
            with stop.installed(note):
                stopping = False
                while self.step < self.total_steps and not stopping:
                    began = self._clock.mark()
                    micro_batches = self._next_micro_batches()
                    step = self._guard_oom(self._optimizer_step, micro_batches, began)
                    self.step += 1
                    self.tokens_seen += step.tokens
                    step.known = {"step": self.step,
                                  "epoch": round(self.epoch + self.step_in_epoch / self.steps_per_epoch, 4),
                                  "lr": self.schedule(self.step - 1)}
                    validate = bool(self._due(cfg.step_scheduler.val_every_steps) and self.val_batches)
                    pending.hold(step, read_now=validate or self.step >= self.total_steps)
                    if validate:
                        self._guard_oom(self._validate, display)
                    stopping = self._agree_on_stop(stop)
                    if self._due(cfg.step_scheduler.ckpt_every_steps) or stopping:
                        pending.flush()
                        self._save_checkpoint(started)
                        saved_at = self.step
                pending.flush()
                if self._agree_on_stop(stop) and saved_at != self.step:  # the signal came after the check above
                    self._save_checkpoint(started)
        except BaseException:
            with contextlib.suppress(Exception):  # keep the last finished step's row when a later one fails
                pending.flush()
            raise
        finally:
            if display:
                display.close()
        elapsed = self.elapsed_before + time.monotonic() - started
        if stop.signum is not None:
            return self._stopped(stop, elapsed)
        if self.val_batches and (self.last_val is None or self.last_val["step"] != self.step):
            self._guard_oom(self._validate, None)
        # ranks: every process takes part in gathering FSDP2's shards; rank 0 writes
        weights = sharding.full_weights(self.model, trainable_only=self.lora) if self.sharded else None
        self.peaks_by_rank = self.world.gather_int(self._peak_memory())  # ranks: for the manifest
        final = self._save_final(elapsed, weights) if self.is_main else None
        self.world.barrier()  # ranks: the run ends when final/ is written
        result = TrainResult(self.run_dir, final, self.step, self.last_train_loss,
                             self.last_val and self.last_val["loss"], self.last_val and self.last_val["token_accuracy"],
                             self.tokens_seen, elapsed)
        self._print_done(result)
        return result

    def _agree_on_stop(self, stop: StopFlag) -> bool:
        """Whether to stop after this step, the same answer on every process (ranks: a signal may reach one
        process a step before another; each takes the signal any of them got)."""
        signum = self.world.max_int(stop.signum or 0)
        if signum and stop.signum is None:
            stop.request(signum)
        return bool(signum)

    def _log_step(self, step: QueuedStep, note, display: ProgressDisplay | None) -> None:
        """Read a queued step's numbers from the device and write its row (metrics.jsonl, progress, trackers)."""
        loss, grad_norm, seconds, since_started = step.read(self._clock, self._origin)
        self.last_train_loss = loss
        row = {
            "step": step.known["step"], "epoch": step.known["epoch"], "loss": loss, "lr": step.known["lr"],
            "grad_norm": grad_norm, "tokens": step.tokens,
            "tokens_per_s": step.tokens / seconds if seconds > 0 else 0.0,
            "peak_mem_mb": self._peak_memory() / MB,
            "elapsed_s": round(self.elapsed_before + since_started, 3),
        }
        if self.scaler.is_enabled():
            row.update(loss_scale=step.loss_scale, skipped=step.skipped)
            if step.skipped:
                note(f"step {row['step']}: float16 gradients overflowed; the update was skipped and the "
                     f"loss scale lowered to {step.loss_scale:g}")
        if self.is_main:
            self.metrics.append(row)
            display.update(row)
            if self.trackers:
                self.trackers.log("train", row)

    def _optimizer_step(self, micro_batches: list[dict[str, torch.Tensor]], began: Any) -> QueuedStep:
        """One optimizer step over its micro-batches (collated after the clock mark `began`). Nothing in it
        waits for the device (except float16 loss scaling: one read of the scale the scaler chose): its loss
        and gradient norm are returned as device tensors."""
        # ranks: the loss is divided by the supervised tokens of the whole step, on all processes together
        supervised, tokens = self.world.sum_([sum(batching.supervised_tokens(b) for b in micro_batches),
                                              sum(batching.input_tokens(b) for b in micro_batches)])
        num_supervised = max(1, int(supervised))
        total_loss = torch.zeros((), device=self.device)
        for batch in self._same_count_everywhere(micro_batches):
            loss_sum, _ = self._loss_sum(batch)
            loss = loss_sum / num_supervised  # the mean over the whole step, whatever the split
            self.scaler.scale(loss).backward()
            total_loss += loss.detach()
        if self.sharded is None:  # ranks: the step's gradient is the sum of the processes' (FSDP2 summed them)
            self.world.reduce_gradients(self.trainable)
        self.world.sum_tensor_(total_loss)
        self.scaler.unscale_(self.optimizer)  # clipping sees the true gradients
        max_norm = self.cfg.clip_grad_norm.max_norm
        grad_norm = sharding.clip_gradients(self.trainable, max_norm if max_norm is not None else math.inf)
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)  # skips the update when the gradients hold inf/nan (float16 only)
        self.scaler.update()
        # The scale only drops when the update was skipped, so one read after the update tells both (1.0 without
        # a device read when the scaler is off).
        previous_scale, self._loss_scale = self._loss_scale, self.scaler.get_scale()
        skipped = self._loss_scale < previous_scale
        self.skipped_steps += skipped
        self.optimizer.zero_grad(set_to_none=True)
        return QueuedStep(total_loss, grad_norm.detach(), int(tokens), skipped, self._loss_scale, began,
                          self._clock.mark())

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over supervised tokens (float32), and the count of correct predictions
        (shared with eval/model_eval: `losses.loss_sum`)."""
        with self._compute_precision():
            return sharding.run(self.sharded, lambda: losses.loss_sum(self.model, batch, self.device, self.loss_head))

    @torch.no_grad()
    def _validate(self, display: ProgressDisplay | None) -> dict[str, Any]:
        """Score the validation batches, with progress on rank 0 (over its own share of the batches): a bar in
        place of the training bar (`display`, while training), which comes back once they are scored."""
        self.model.eval()
        shown = console.Progress(f"validation (step {self.step})", len(self.val_batches), "batches",
                                 pausing=display and display.bar) if self.is_main else contextlib.nullcontext()
        # ranks: under FSDP2 every batch gathers weights, all in one root pass
        with shown as progress, self._compute_precision():
            batches = progress.each(self.val_batches) if progress else self.val_batches
            score = sharding.run(self.sharded, lambda: losses.score_batches(self.model, batches, self.device,
                                                                            self.loss_head))
        self.model.train()
        loss_sum, correct, tokens = self.world.sum_([score.loss_sum, score.correct, score.tokens])  # ranks
        score = losses.LossScore(loss_sum, int(correct), int(tokens))
        row = {"step": self.step, "loss": score.loss, "token_accuracy": score.token_accuracy, "tokens": score.tokens}
        self.last_val = row
        if self.is_main:
            self.validation_log.append(row)
            if self.trackers:
                self.trackers.log("validation", row)
            console.event("validation", **row)
            line = f"validation at step {self.step}: loss {row['loss']:.4f}, token accuracy {row['token_accuracy']:.3f}"
            (display.note if display else console.info)(line)
        return row

    def _next_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of the next optimizer step; advances the data position."""
        sched, dl = self.cfg.step_scheduler, self.cfg.dataloader
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order = batching.epoch_order(self.lengths, self.epoch, seed=self.cfg.seed, shuffle=dl.shuffle,
                                               group_by_length=dl.group_by_length,
                                               global_batch_size=sched.global_batch_size)
            self._order_epoch = self.epoch
        indices = batching.step_rows(self._order, self.step_in_epoch, sched.global_batch_size,
                                     rank=self.rank, world_size=self.world_size, lengths=self.lengths)
        self.step_in_epoch += 1
        rows = [self.train_data.rows[i] for i in indices]
        return self._micro_batches(rows)

    def _same_count_everywhere(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """ranks: under FSDP2, empty micro-batches (nothing supervised) up to the most any process has."""
        if self.sharded is None:
            return batches
        empty = TokenizedRow([self.pad_id] * 2, [False] * 2, source_row=0)
        return sharding.pad_to_common_count(batches, self.world, lambda: self._micro_batches([empty])[0])

    def _due(self, every: int | None) -> bool:
        return every is not None and self.step % every == 0

    def _guard_oom(self, function, *args):
        """Run `function`; an out-of-memory becomes `error[oom]` with the advice ladder and the step.
        (CPU tests reach this path by making the model raise torch.OutOfMemoryError.)"""
        try:
            return function(*args)
        except Exception as exc:
            if not memory.is_out_of_memory(exc):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            latest = checkpoints.latest_checkpoint(self.run_dir)
            kept = f"; the last checkpoint, {latest}, is intact" if latest else "; no checkpoint was written yet"
            raise memory.oom_error(
                f"out of memory at step {self.step + 1} of {self.total_steps} ({self.device.type}){kept}",
                self.lora, predicted=False,
                offer_qlora=self.cfg.model.quantization is None and self.device.type != "cpu",
            ) from None

    def _peak_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return memory.peak_rss()
