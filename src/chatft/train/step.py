"""`chatft run sft/automodel` and `chatft run peft/automodel`.

In: a `CompiledConfig` (its `validated` is a `TrainingConfig`; `job.yaml` is already in the run dir).
Out: the run dir (see loop.py), or a `ChatftError`. A run stopped by SIGTERM/SIGINT exits with status
128 + the signal number (143 / 130) after saving a checkpoint and saying how to resume.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from chatft.config.compile import CompiledConfig
from chatft.config.schema import TrainingConfig
from chatft.errors import ChatftError


def check_supported(cfg: TrainingConfig, job_file: Path | None = None) -> None:
    """Refuse what this release cannot do yet, before anything heavy is loaded."""
    written = f" (the config compiled and {job_file} was written; nothing was trained)" if job_file else ""
    if cfg.data_parallel_size() > 1:
        raise ChatftError(
            "not_available_yet",
            f"training on {cfg.data_parallel_size()} data-parallel processes is not implemented yet{written}",
            "run on one process (drop --nproc-per-node / run.env.* / distributed.dp_size) for now",
        )
    for section in ("wandb", "mlflow"):
        if getattr(cfg, section) is not None:
            raise ChatftError(
                "not_available_yet",
                f"the `{section}` section is set but {section} logging is not implemented yet{written}",
                f"remove the `{section}` section; metrics.jsonl, loss.png and logging.tensorboard=true are available",
            )
    if cfg.packed_sequence.split_across_pack:
        raise ChatftError(
            "not_available_yet",
            f"packed_sequence.split_across_pack=true: splitting a conversation across packs is not implemented{written}",
            "set packed_sequence.split_across_pack=false (each conversation stays whole inside one pack)",
        )
    if cfg.logging.tensorboard:
        from chatft.train.metrics import require_tensorboard

        require_tensorboard()


def resume_command() -> str | None:
    """The command line that started this run, when it came through the `chatft` CLI."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    if program in ("chatft", "__main__.py"):
        return shlex.join(["chatft", *sys.argv[1:]])
    return None


def run_step(compiled: CompiledConfig) -> None:
    from chatft.run import run_dir
    from chatft.train import memory
    from chatft.train.loop import Trainer, prepare_run_dir
    from chatft.train.model import load_tokenizer, pick_device

    from chatft.run import JOB_FILE

    cfg: TrainingConfig = compiled.validated
    directory = run_dir(compiled)
    check_supported(cfg, directory / JOB_FILE)
    resume_from = prepare_run_dir(cfg, directory)

    # Weights, gradients and optimizer states need only the model's config.json: a model that cannot fit
    # whatever the data stops before anything is read or loaded.
    device = pick_device()
    memory.check_fits(memory.estimate_memory(cfg, device=device).weights_and_optimizer(), device, cfg.force,
                      what="the weights, gradients and optimizer states alone")

    from chatft.data.pipeline import prepare_training_data

    tokenizer = load_tokenizer(cfg.model)
    train_data = prepare_training_data(cfg.dataset, tokenizer)  # also sets the chat template trained with
    val_data = None
    if cfg.validation_dataset is not None:
        val_data = prepare_training_data(cfg.validation_dataset, tokenizer, key="validation_dataset")
    # Activations and logits for the largest micro-batch these rows can form (not rows of seq_length).
    estimate = memory.estimate_memory(cfg, device=device, lengths=memory.row_lengths(train_data, val_data))
    fit_note = memory.check_fits(estimate, device, cfg.force)

    trainer = Trainer(cfg, directory, tokenizer, train_data, val_data, estimate=estimate,
                      resolved_config=compiled.effective(), resume_command=resume_command())
    trainer.setup(resume_from, notes=[fit_note] if fit_note else [])
    result = trainer.train()
    if result.stopped_by is not None:
        raise SystemExit(result.exit_code)
