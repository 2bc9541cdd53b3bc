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
from chatft.config.loader import deep_merge, load_with_defaults, parse_overrides, resolve_interpolations
from chatft.config.schema import Section, validate_config
from chatft.errors import ChatftError, did_you_mean
from chatft.steps.registry import Step

@dataclass
class CompiledConfig:
    step: Step
    files: list[Path]
    overrides: list[str]
    raw: dict[str, Any]
    resolved: dict[str, Any]
    validated: Section
    warnings: list[str] = field(default_factory=list)

    def effective(self) -> dict[str, Any]:
        """The config chatft runs with: every key, defaults filled in, JSON-friendly."""
        return self.validated.model_dump(mode="json")


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
    source = str(path) + (" with overrides" if overrides else "")
    validated = validate_config(step.config_schema, translated, source)
    return CompiledConfig(step, files, overrides, raw, resolved, validated, warnings)


def get_path(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node
