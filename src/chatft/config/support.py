"""What this release does with a valid training config, decided when it compiles: what it cannot do yet (a
refusal) and which accepted keys have no effect (one warning each). At compile time, so `chatft run --dry-run`
reports both before anything is loaded, and a real run stops before it writes anything.

In: a validated `TrainingConfig`. Out: `unsupported(cfg)`, the `not_available_yet` error or None, and
`no_effect_warnings(cfg)`. `tests/test_config_support.py` walks every key of the schema and fails for one that
training neither reads nor names here.
"""

from __future__ import annotations

from typing import Any

from chatft.config.automodel import does_not_apply
from chatft.config.schema import TrainingConfig
from chatft.errors import ChatftError

ONE_PROCESS = "the run has one process"
# Keys AutoModel configs carry that this release accepts and does not use, with why (warned when set away from
# their default).
NO_EFFECT: dict[str, str] = {
    "dataloader.num_workers": "batches are made in the training process from the tokenized rows, with no loader "
                              "workers",
    "validation_dataloader.shuffle": "validation batches are formed in file order, local_batch_size at a time",
    "validation_dataloader.num_workers": "validation batches are made in the training process",
    "validation_dataloader.group_by_length": "validation batches are formed in file order, local_batch_size at a "
                                             "time",
}
# Keys that act only when several processes train (`train/distributed.py`): warned when set on one process.
ONLY_WITH_SEVERAL_PROCESSES: dict[str, str] = {
    "dist_env.backend": ONE_PROCESS,
    "dist_env.timeout_minutes": ONE_PROCESS,
    "distributed.strategy": f"{ONE_PROCESS}: nothing is sharded or replicated",
}


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = getattr(tree, part)
    return tree


def no_effect_warnings(cfg: TrainingConfig) -> list[str]:
    defaults = TrainingConfig.model_construct(**{name: field.get_default(call_default_factory=True)
                                                 for name, field in TrainingConfig.model_fields.items()
                                                 if not field.is_required()})
    table = {**NO_EFFECT, **(ONLY_WITH_SEVERAL_PROCESSES if cfg.data_parallel_size() == 1 else {})}
    warnings = [does_not_apply(key, value, why) for key, why in table.items()
                if (value := _get(cfg, key)) != _get(defaults, key)]
    return warnings


def unsupported(cfg: TrainingConfig) -> ChatftError | None:
    """The first thing in `cfg` this release cannot do, as the error to raise, or None."""
    if cfg.packed_sequence.split_across_pack:
        return ChatftError(
            "not_available_yet",
            "packed_sequence.split_across_pack=true: splitting a conversation across packs is not implemented",
            "set packed_sequence.split_across_pack=false (each conversation stays whole inside one pack)",
        )
    return None


def check_supported(cfg: TrainingConfig) -> None:
    """Raise `unsupported(cfg)`, if any."""
    if (error := unsupported(cfg)) is not None:
        raise error
