"""May a checkpoint be continued with the settings given now? Decided from two configs, before anything loads.

In: the resolved config now (`TrainingConfig`) and the checkpoint's `state.json` (its `config`, the resolved config
it was written with, and `data_sha256`, the training data's digest then). Out: the changes that are safe, as
{dotted key: (old, new)}, which the run records as made at the checkpoint's step; or `error[resume_mismatch]`
listing every change that would alter what is trained, old -> new, with how to start over or fork.

Safe are the settings that decide only when the run stops, when it checkpoints, validates and logs, and how fast
and in how much memory a step runs, with the same rows in the same order and the same arithmetic
(`SAFE_KEYS`). Everything else (model, data, optimizer, schedule, LoRA, seed, global batch, ...) changes the model
being trained or what the saved data position means, and is refused. The training data counts by content: a
file moved to another path with the same sha256 is the same data, a file edited in place is not.
"""

from __future__ import annotations

from typing import Any

from chatft.config.schema import TrainingConfig
from chatft.errors import ChatftError
from chatft.data.sources import data_sha256

# Dotted keys (or section prefixes ending in ".") whose change leaves the trained model and data position alone.
SAFE_KEYS = (
    "step_scheduler.max_steps",  # train longer or shorter (the schedule's length follows; recorded)
    "step_scheduler.num_epochs",
    "step_scheduler.ckpt_every_steps",
    "step_scheduler.val_every_steps",
    "step_scheduler.local_batch_size",  # the same step split into other micro-batches: the loss is per step
    "checkpoint.",  # where and how often checkpoints go: resuming from another dir forks the run
    "logging.",
    "wandb",
    "mlflow",
    "force",
    "compile.",
    "dataloader.num_workers",
    "validation_dataset",
    "validation_dataloader.",
    "distributed.",  # recomputation, the number of processes and how they hold the weights: the same steps
    "dist_env.",
    "run.env.",
    "packed_sequence.padding_free",  # the same conversations per step, laid out differently
    "packed_sequence.packed_sequence_size",
    "model.attn_implementation",
)
DATA_PATH = "dataset.path_or_dataset_id"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value}; lists are leaves; an empty or null section is one leaf."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def is_safe(key: str) -> bool:
    return any(key == safe or key.startswith(safe if safe.endswith(".") else safe + ".") for safe in SAFE_KEYS)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between two resolved configs, with (old, new)."""
    before, after = flatten(old), flatten(new)
    missing = object()
    changes = {}
    for key in sorted(set(before) | set(after)):
        old_value, new_value = before.get(key, missing), after.get(key, missing)
        if old_value != new_value:
            changes[key] = (None if old_value is missing else old_value, None if new_value is missing else new_value)
    return changes


def training_data_sha256(cfg: TrainingConfig) -> str | None:
    return data_sha256(cfg.dataset.path_or_dataset_id)


def check_resume(cfg: TrainingConfig, state: dict[str, Any], where: str,
                 data_sha256: str | None = None) -> dict[str, tuple[Any, Any]]:
    """The safe changes between the checkpoint at `where` (its `state`) and `cfg`; refuses any other change.
    A checkpoint from before configs were recorded is compared as it always was (`Trainer._resume`)."""
    recorded = state.get("config")
    if recorded is None:
        return {}
    changes = config_changes(recorded, cfg.model_dump(mode="json"))
    now_sha = data_sha256 if data_sha256 is not None else training_data_sha256(cfg)
    then_sha = state.get("data_sha256")
    if then_sha is not None and now_sha is not None:
        if then_sha == now_sha:
            changes.pop(DATA_PATH, None)  # the same rows, found at another path
        else:
            changes["training data (sha256)"] = (then_sha[:12], now_sha[:12])
    refused = {key: change for key, change in changes.items() if not is_safe(key)}
    if refused:
        listing = "\n  ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in refused.items())
        raise ChatftError(
            "resume_mismatch",
            f"cannot resume from {where}: {len(refused)} setting(s) that change what is trained differ from the "
            f"checkpoint's:\n  {listing}",
            "resume with the checkpoint's settings; or start over in this dir (checkpoint.overwrite=true) or in a "
            "new checkpoint.checkpoint_dir; or fork: a new checkpoint.checkpoint_dir with "
            f"checkpoint.resume={where} continues from it, but only settings that do not change what is trained "
            "may differ (max_steps, checkpoint/validation cadence, logging, micro-batch layout)",
        )
    return changes


def check_data_position(state: dict[str, Any], where: str, **expected: Any) -> None:
    """What every checkpoint records, those written before whole configs were (`check_resume`) too: the global
    batch, seed, number of training rows and kind of run, without which the saved data position means nothing."""
    changed = {key: (state.get(key), value) for key, value in expected.items() if state.get(key) != value}
    if changed:
        listing = ", ".join(f"{key}: {old} -> {new}" for key, (old, new) in changed.items())
        raise ChatftError(
            "resume_mismatch",
            f"cannot resume from {where}: the run changed ({listing}), so the data position would mean something else",
            "resume with the settings the checkpoint was written with, or checkpoint.resume=false to start fresh",
        )


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
