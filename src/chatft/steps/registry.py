"""Discover steps from their `step.toml` manifests and resolve step ids.

In: the folders under `chatft/steps/`. Out: `Step` records (what a step consumes and produces, the
parameters a user tunes, strategies, errors, its configs) and the artifact type graph.

Only the standard library is imported here: `chatft --help` and `chatft steps list` must stay fast.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from chatft.errors import ChatftError, did_you_mean

STEPS_DIR = Path(__file__).parent
MANIFEST = "step.toml"
TYPES_FILE = STEPS_DIR / "artifact_types.toml"


class ManifestError(ValueError):
    """A shipped manifest is malformed: a bug in chatft, caught by the test suite."""


@dataclass(frozen=True)
class Port:
    type: str
    required: bool
    description: str


@dataclass(frozen=True)
class Parameter:
    name: str
    default: Any
    description: str
    choices: list[Any] | None = None
    typical: str | None = None


@dataclass(frozen=True)
class Strategy:
    when: str
    then: str


@dataclass(frozen=True)
class ErrorCase:
    id: str
    when: str
    recovery: str


@dataclass(frozen=True)
class Step:
    id: str
    name: str
    category: str
    description: str
    tags: list[str]
    consumes: list[Port]
    produces: list[Port]
    parameters: list[Parameter]
    strategies: list[Strategy]
    errors: list[ErrorCase]
    config_schema: str  # which schema in chatft.config.schema validates this step's configs
    output_key: str  # the config key naming the run's output (job.yaml goes there, or beside it)
    output_is_file: bool  # the output key names a file: the run's folder is the file's folder
    entry_point: str  # "module:function" that runs the step, given its CompiledConfig
    preflight: str | None  # "module:function" checked before job.yaml is written, or None
    dir: Path = field(compare=False)

    @property
    def config_dir(self) -> Path:
        return self.dir / "config"

    def config_names(self) -> list[str]:
        return sorted(p.stem for p in self.config_dir.glob("*.yaml"))

    def summary(self) -> dict[str, Any]:
        """The `steps list --json` shape."""
        return {
            "id": self.id,
            "name": self.name,
            "category": self.category,
            "description": self.description,
            "tags": self.tags,
            "consumes": [vars(p) for p in self.consumes],
            "produces": [vars(p) for p in self.produces],
            "parameters": [
                {"name": p.name, "default": p.default, "description": p.description, "choices": p.choices}
                for p in self.parameters
            ],
        }

    def details(self) -> dict[str, Any]:
        """The `steps show --json` shape: the summary plus strategies, errors and configs."""
        return {
            **self.summary(),
            "parameters": [vars(p) for p in self.parameters],
            "strategies": [vars(s) for s in self.strategies],
            "errors": [vars(e) for e in self.errors],
            "configs": self.config_names(),
        }


def _require(table: dict[str, Any], key: str, path: Path) -> Any:
    if key not in table:
        raise ManifestError(f"{path}: missing `{key}`")
    return table[key]


def _one_paragraph(text: str) -> str:
    """TOML multi-line strings wrap at the source's width; the terminal wraps them again."""
    return " ".join(text.split())


def _ports(entries: list[dict[str, Any]], path: Path) -> list[Port]:
    return [
        Port(type=_require(e, "type", path), required=e.get("required", True), description=e.get("description", ""))
        for e in entries
    ]


def load_step(manifest_path: Path) -> Step:
    with manifest_path.open("rb") as fh:
        raw = tomllib.load(fh)
    step_dir = manifest_path.parent
    step_id = _require(raw, "id", manifest_path)
    expected_id = step_dir.relative_to(STEPS_DIR).as_posix()
    if step_id != expected_id:
        raise ManifestError(f"{manifest_path}: id {step_id!r} does not match its folder {expected_id!r}")
    return Step(
        id=step_id,
        name=_require(raw, "name", manifest_path),
        category=_require(raw, "category", manifest_path),
        description=_one_paragraph(_require(raw, "description", manifest_path)),
        tags=raw.get("tags", []),
        consumes=_ports(raw.get("consumes", []), manifest_path),
        produces=_ports(raw.get("produces", []), manifest_path),
        parameters=[
            Parameter(
                name=_require(p, "name", manifest_path),
                default=p.get("default"),
                description=_require(p, "description", manifest_path),
                choices=p.get("choices"),
                typical=p.get("typical"),
            )
            for p in raw.get("parameters", [])
        ],
        strategies=[Strategy(**s) for s in raw.get("strategies", [])],
        errors=[ErrorCase(**e) for e in raw.get("errors", [])],
        config_schema=_require(raw, "config_schema", manifest_path),
        output_key=_require(raw, "output_key", manifest_path),
        output_is_file=raw.get("output_is_file", False),
        entry_point=_require(raw, "entry_point", manifest_path),
        preflight=raw.get("preflight"),
        dir=step_dir,
    )


@cache
def all_steps() -> dict[str, Step]:
    """Every registered step, by id, in id order."""
    steps = [load_step(path) for path in sorted(STEPS_DIR.glob(f"*/*/{MANIFEST}"))]
    return {step.id: step for step in steps}


def resolve_step(step_id: str) -> Step:
    """A step by exact id, or by its last path part when only one step has it (`merge_lora`)."""
    steps = all_steps()
    if step_id in steps:
        return steps[step_id]
    by_name = [s for s in steps.values() if s.id.rsplit("/", 1)[-1] == step_id]
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        ids = ", ".join(s.id for s in by_name)
        raise ChatftError("config_invalid", f"step name {step_id!r} is ambiguous: {ids}", f"use the full id, one of: {ids}")
    short_names = [s.rsplit("/", 1)[-1] for s in steps]
    names = list(steps) + [n for n in short_names if short_names.count(n) == 1]
    close = did_you_mean(step_id, names)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ChatftError(
        "config_invalid",
        f"unknown step {step_id!r}",
        f"{hint}`chatft steps list` shows the {len(steps)} registered steps",
    )


@dataclass(frozen=True)
class ArtifactType:
    name: str
    description: str
    is_a: list[str]
    convert_to: list[dict[str, str]]


@cache
def artifact_types() -> dict[str, ArtifactType]:
    with TYPES_FILE.open("rb") as fh:
        raw = tomllib.load(fh)
    return {
        name: ArtifactType(
            name=name,
            description=entry["description"],
            is_a=entry.get("is_a", []),
            convert_to=entry.get("convert_to", []),
        )
        for name, entry in raw.items()
    }


def is_a(type_name: str, ancestor: str) -> bool:
    """True when an artifact of `type_name` is also an `ancestor` (reflexive, transitive)."""
    types = artifact_types()
    pending, seen = [type_name], set()
    while pending:
        current = pending.pop()
        if current == ancestor:
            return True
        if current in seen or current not in types:
            continue
        seen.add(current)
        pending.extend(types[current].is_a)
    return False


def filter_steps(category: str | None = None, consumes: str | None = None, produces: str | None = None) -> list[Step]:
    """Steps matching every filter given. `consumes=T` finds steps that accept a T (directly or as one of
    its `is_a` parents); `produces=T` finds steps whose output is a T."""
    known = artifact_types()
    for wanted in (consumes, produces):
        if wanted is not None and wanted not in known:
            close = did_you_mean(wanted, known)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ChatftError("config_invalid", f"unknown artifact type {wanted!r}", f"{hint}known types: {', '.join(known)}")
    selected = []
    for step in all_steps().values():
        if category is not None and step.category != category:
            continue
        if consumes is not None and not any(is_a(consumes, port.type) for port in step.consumes):
            continue
        if produces is not None and not any(is_a(port.type, produces) for port in step.produces):
            continue
        selected.append(step)
    return selected
