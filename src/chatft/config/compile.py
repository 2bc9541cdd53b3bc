"""Compile a step's config: find the file, inherit, override, interpolate, translate, validate.

In: a step, `-c NAME_OR_PATH`, `key.path=value` overrides. Out: `CompiledConfig` with the raw config
(as written, after inheritance and overrides, before interpolation), the resolved dict, the validated
model and the warnings about settings that do not apply. Nothing is written here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatft.config.automodel import translate
from chatft.config.lenient import drop_unknown_speed_keys
from chatft.config.loader import deep_merge, load_with_defaults, parse_overrides, resolve_interpolations
from chatft.config import support
from chatft.config.schema import SCHEMAS, Section, TrainingConfig, known_paths, validate_config
from chatft.errors import ChatftError, did_you_mean
from chatft.steps.registry import Step

# Hugging Face TrainingArguments (and TRL SFTConfig) names that people carry over, with what chatft calls them.
# The schema's did-you-mean only finds spellings close to a key; these are far from theirs. A name whose last
# part is chatft's own (`weight_decay`, `max_steps`, `seed`) needs no entry: the schema already suggests the
# section it belongs in.
TRAINER_NAMES: dict[str, str] = {
    "learning_rate": "`optimizer.lr`",
    "num_train_epochs": "`step_scheduler.num_epochs`",
    "per_device_train_batch_size": "`step_scheduler.local_batch_size`",
    "gradient_accumulation_steps": "not a key: accumulation follows from the batch sizes, so set "
                                   "`step_scheduler.global_batch_size` = local_batch_size x accumulation steps "
                                   "x data-parallel size",
    "max_seq_length": "`dataset.seq_length`",
    "max_length": "`dataset.seq_length`",
    "output_dir": "`checkpoint.checkpoint_dir`",
    "warmup_steps": "`lr_scheduler.lr_warmup_steps`",
    "lr_scheduler_type": "`lr_scheduler.lr_decay_style`",
    "save_steps": "`step_scheduler.ckpt_every_steps`",
    "eval_steps": "`step_scheduler.val_every_steps`",
    "max_grad_norm": "`clip_grad_norm.max_norm`",
    "gradient_checkpointing": "`distributed.activation_checkpointing`",
}

@dataclass
class CompiledConfig:
    step: Step
    files: list[Path]
    overrides: list[str]
    raw: dict[str, Any]
    resolved: dict[str, Any]
    validated: Section
    warnings: list[str] = field(default_factory=list)
    refusal: ChatftError | None = None  # training: what this release cannot do with it (`support.unsupported`)

    def effective(self) -> dict[str, Any]:
        """The config chatft runs with: every key, defaults filled in, JSON-friendly."""
        return self.validated.model_dump(mode="json")

    def output_dir(self) -> Path:
        """The folder the step writes into: its output key's value, or that file's folder."""
        target = Path(str(get_path(self.effective(), self.step.output_key)))
        return target.parent if self.step.output_is_file else target


def find_config(step: Step, name_or_path: str | None) -> Path:
    """`-c` is a file path, or the name of a config in the step's `config/` dir (default: `default`)."""
    if name_or_path is None:
        name_or_path = "default"
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate
    looks_like_path = candidate.suffix in (".yaml", ".yml") or len(candidate.parts) > 1
    if not looks_like_path and (step.config_dir / f"{name_or_path}.yaml").is_file():
        return step.config_dir / f"{name_or_path}.yaml"
    names = step.config_names()
    close = did_you_mean(name_or_path, names)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    if looks_like_path:
        raise ChatftError("config_invalid", f"config file {candidate} does not exist", f"{hint}check the path")
    raise ChatftError(
        "config_invalid",
        f"{step.id} has no config named {name_or_path!r}",
        f"{hint}its configs are: {', '.join(names)}; or pass a path to a YAML file",
    )


def compile_config(step: Step, config: str | None = None, overrides: list[str] | None = None) -> CompiledConfig:
    overrides = list(overrides or [])
    path = find_config(step, config)
    merged, files = load_with_defaults(path)
    raw = deep_merge(merged, parse_overrides(overrides))
    resolved = resolve_interpolations(raw)
    translated, warnings = translate(copy.deepcopy(resolved), step.config_schema)
    if step.config_schema == "training":
        warnings += drop_unknown_speed_keys(translated, set(known_paths(TrainingConfig)))
    source = str(path) + (" with overrides" if overrides else "")
    try:
        validated = validate_config(step.config_schema, translated, source)
    except ChatftError as error:
        raise with_trainer_names(error, translated, step.config_schema) from None
    refusal = None
    if isinstance(validated, TrainingConfig):
        warnings += support.no_effect_warnings(validated)
        refusal = support.unsupported(validated)
    return CompiledConfig(step, files, overrides, raw, resolved, validated, warnings, refusal)


def _key_paths(node: Any, prefix: str = "") -> list[str]:
    paths: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            paths.append(path)
            paths.extend(_key_paths(value, f"{path}."))
    return paths


def trainer_name_hints(config: dict[str, Any], schema: str) -> list[str]:
    """'`learning_rate` is `optimizer.lr`' for each TrainingArguments name used as a key of `config`, where the
    schema has no such key (a free-form mapping such as `mlflow.tags` may hold any name)."""
    if schema != "training":
        return []
    known = set(known_paths(SCHEMAS[schema]))
    hints = []
    for path in _key_paths(config):
        parent, _, leaf = path.rpartition(".")
        is_section = not parent or any(k.startswith(parent + ".") for k in known)
        if leaf in TRAINER_NAMES and path not in known and is_section:
            hints.append(f"`{path}` is {TRAINER_NAMES[leaf]}")
    return hints


def with_trainer_names(error: ChatftError, config: dict[str, Any], schema: str) -> ChatftError:
    """The validation error, its hint led by chatft's names for the TrainingArguments names it lists."""
    hints = trainer_name_hints(config, schema)
    if not hints:
        return error
    lines = "\n".join(f"  {hint}" for hint in hints)
    return ChatftError(error.id, error.message,
                       f"these are Hugging Face TrainingArguments names; in chatft:\n{lines}\n{error.hint}")


def get_path(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node
