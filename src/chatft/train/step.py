"""The way into training: `train()`, which `chatft run sft/automodel|peft/automodel` (`run_step`), the tests and
the bench all call.

In: a validated `TrainingConfig` and the run dir (the CLI has already written `job.yaml` there); optionally the
tokenized data and a tokenizer (tests and the bench prepare them once). Out: the run dir (see loop.py) and a
`TrainResult`, or a `ChatftError`. A run stopped by SIGTERM/SIGINT exits with status 128 + the signal number
(143 / 130) after saving a checkpoint and saying how to resume.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from chatft import launch, quantization, trackers
from chatft.config.compile import CompiledConfig
from chatft.config.support import check_supported
from chatft.config.schema import TrainingConfig
from chatft.data import pipeline
from chatft.data.types import PreparedData
from chatft.report import write_report_after_training
from chatft.train import distributed, memory
from chatft.train.loop import Trainer, TrainResult
from chatft.train.model import load_tokenizer, pick_device
from chatft.train.run_dir import prepare_run_dir


def resume_command() -> str | None:
    """The command line that started this run, when it came through the `chatft` CLI."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    if program in ("chatft", "__main__.py"):
        return shlex.join(["chatft", *sys.argv[1:]])
    return None


def train(
    cfg: TrainingConfig,
    run_dir: str | Path,
    train_data: PreparedData | None = None,
    val_data: PreparedData | None = None,
    *,
    tokenizer: Any = None,
    estimate: memory.MemoryEstimate | None = None,
    resolved_config: dict[str, Any] | None = None,
    resume_command: str | None = None,
) -> TrainResult:
    """The one way into training, for the CLI, the tests and the bench: refuse what cannot run, join the other
    processes when torchrun started several (`distributed.start`; each logs to `logs/rank_N.log`), decide how the
    run dir starts (fresh or resumed, `run_dir.prepare_run_dir`, on rank 0), check that weights, gradients and
    optimizer states fit before any data is read, tokenize the data (unless given; rank 0 first, filling the cache
    the others then read), check the estimate for the largest micro-batch those rows form, then set up the
    `Trainer` and run it. The result keeps the trainer (`TrainResult.trainer`) for callers that read the trained
    model back."""
    run_dir = Path(run_dir)
    check_supported(cfg)
    quantization.check_training(cfg)  # a 4-bit base: LoRA only, bitsandbytes installed, before anything loads
    trackers.require_extras(cfg)  # TensorBoard, W&B, MLflow: a missing extra is found before anything loads
    joined = launch.joined_env()
    launch.check_layout(cfg.data_parallel_size(), joined.world_size if joined else 1)
    world = distributed.start(cfg.dist_env.backend, cfg.dist_env.timeout_minutes)
    try:
        with distributed.process_output(run_dir, world):
            return _train(cfg, run_dir, world, train_data, val_data, tokenizer=tokenizer, estimate=estimate,
                          resolved_config=resolved_config, resume_command=resume_command)
    finally:
        world.close()


def _train(cfg: TrainingConfig, run_dir: Path, world: distributed.World, train_data: PreparedData | None,
           val_data: PreparedData | None, *, tokenizer: Any, estimate: memory.MemoryEstimate | None,
           resolved_config: dict[str, Any] | None, resume_command: str | None) -> TrainResult:
    resume_from = world.on_main(lambda: prepare_run_dir(cfg, run_dir))
    device = pick_device()
    # Weights, gradients and optimizer states need only the model's config.json: a model that cannot fit
    # whatever the data stops before anything is read or loaded.
    memory.check_fits(memory.estimate_memory(cfg, device=device).weights_and_optimizer(), device, cfg.force,
                      what="the weights, gradients and optimizer states alone")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    if train_data is None:
        def prepare() -> tuple[PreparedData, PreparedData | None]:  # also sets the chat template trained with
            data = pipeline.prepare_training_data(cfg.dataset, tokenizer)
            validation = None
            if cfg.validation_dataset is not None:
                validation = pipeline.prepare_training_data(cfg.validation_dataset, tokenizer,
                                                            key="validation_dataset")
            return data, validation

        train_data, val_data = world.main_first(prepare)
    notes = []
    if estimate is None:  # activations and logits for the largest micro-batch these rows form
        estimate = memory.estimate_memory(cfg, device=device, lengths=memory.row_lengths(train_data, val_data))
        notes.append(memory.check_fits(estimate, device, cfg.force) or "")
    trainer = Trainer(cfg, run_dir, tokenizer, train_data, val_data, estimate=estimate,
                      resolved_config=resolved_config, resume_command=resume_command, world=world)
    trainer.setup(resume_from, notes=notes)
    # rank 0: every step and validation also goes to the trackers that are on, then the final artifact's path
    with trackers.attached_to(trainer, cfg, run_dir, main=world.is_main) as tracking:
        result = trainer.train()
        tracking.finish(result)
    result.trainer = trainer
    if world.is_main:  # report.html; a failure there is a warning, never the run's
        write_report_after_training(run_dir)
    return result


def run_step(compiled: CompiledConfig) -> None:
    """`chatft run sft/automodel|peft/automodel`: train; a run stopped by a signal exits with its status."""
    result = train(compiled.validated, compiled.output_dir(), resolved_config=compiled.effective(),
                   resume_command=resume_command())
    if result.stopped_by is not None:
        raise SystemExit(result.exit_code)
