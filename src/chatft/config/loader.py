"""YAML → one plain dict: `defaults:` inheritance, `key.path=value` overrides, `${...}` interpolation.

In: a config file path and a list of overrides. Out: the merged config before interpolation (what the
user wrote, recorded as the "raw" config) and after it (the "resolved" config that gets validated).

Merging is our own small deep merge on plain dicts rather than OmegaConf's: a child may replace a mapping
with a scalar (`peft: lora` over a LoRA block, `peft: null` over anything), which OmegaConf's typed merge
refuses. OmegaConf is used for what it does well: YAML typing of values and the `${oc.env:...}` and
`${oc.select:...}` resolvers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from chatft import paths
from chatft.errors import ChatftError

DEFAULTS_KEY = "defaults"
SELF_ENTRY = "_self_"  # Hydra's marker for where the file itself sits among its defaults


def deep_merge(base: Any, override: Any) -> Any:
    """`override` on top of `base`: mappings merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def _quoted_lines(lines: list[str], marks: list[Any]) -> str:
    """The lines of the marks (0-based), numbered, with a caret under the last mark's column."""
    numbers = sorted({mark.line for mark in marks})
    shown = []
    for index, number in enumerate(numbers):
        if index and number > numbers[index - 1] + 1:
            shown.append(f"{'':>6} | ...")
        shown.append(f"{number + 1:>6} | {lines[number] if number < len(lines) else '(end of file)'}")
    return "\n".join([*shown, f"{'':>6} | {' ' * marks[-1].column}^"])


def _yaml_error(path: Path, exc: Exception) -> ChatftError:
    """Where the YAML parser stopped and why, with the lines in question quoted. A PyYAML MarkedYAMLError has
    a 0-based `problem_mark` and, for a construct opened earlier (a `[` never closed), a `context_mark`."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:  # no position (an OmegaConf grammar error): its message is all there is
        return ChatftError("config_invalid", f"{path} is not valid YAML: {str(exc).splitlines()[0]}",
                           "fix the syntax; YAML needs `key: value` with consistent indentation")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    opened = context and context_mark is not None and context_mark.line < mark.line
    started = (f" ({context} started at line {context_mark.line + 1}, column {context_mark.column + 1})"
               if opened else "")
    has_tab = mark.line < len(lines) and "\t" in lines[mark.line]
    return ChatftError(
        "config_invalid",
        f"{path} is not valid YAML: {where}: {exc.problem}{started}\n"
        + _quoted_lines(lines, [context_mark, mark] if opened else [mark]),
        f"fix the syntax at {where}; "
        + ("YAML indents with spaces, and that line has a tab" if has_tab else
           "YAML needs `key: value` with consistent indentation, and quotes around values holding `: ` or ` #`"),
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf  # YAML with OmegaConf's typing (1e-8 is a float, null is None)

    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # yaml.YAMLError and OmegaConf's grammar errors alike
        raise _yaml_error(path, exc) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ChatftError(
            "config_invalid",
            f"{path} holds a {type(loaded).__name__}, not a mapping of config sections",
            "a config file is a YAML mapping such as `model:`, `dataset:`, `step_scheduler:` ...",
        )
    return loaded


def _defaults_entries(value: Any, path: Path) -> list[str]:
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ChatftError(
            "config_invalid",
            f"{path}: `defaults` must be a file name or a list of file names, got {value!r}",
            "write `defaults: default.yaml` or `defaults: [base.yaml, extra.yaml]`",
        )
    return entries


def load_with_defaults(path: Path, _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
    """Load `path`, merging the files its `defaults:` names underneath it (later entries win, the file
    itself wins over all of them unless `_self_` places it elsewhere). Returns the merged dict and the
    files read, bases first."""
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ChatftError(
            "config_invalid",
            f"`defaults` inheritance loops: {cycle}",
            "remove the `defaults` entry that points back to a file already in the chain",
        )
    data = _read_yaml(path)
    entries = _defaults_entries(data.pop(DEFAULTS_KEY, []), path)
    if SELF_ENTRY not in entries:
        entries = [*entries, SELF_ENTRY]

    merged: dict[str, Any] = {}
    files: list[Path] = []
    for entry in entries:
        if entry == SELF_ENTRY:
            merged = deep_merge(merged, data)
            continue
        base_path = (path.parent / entry).resolve()
        if not base_path.suffix:
            base_path = base_path.with_suffix(".yaml")
        if not base_path.is_file():
            raise ChatftError(
                "config_invalid",
                f"{path} inherits from {base_path}, which does not exist",
                "`defaults` paths are relative to the file that names them; fix the name or create the base file",
            )
        base, base_files = load_with_defaults(base_path, (*_chain, path))
        merged = deep_merge(merged, base)
        files.extend(f for f in base_files if f not in files)
    files.append(path)
    return merged, files


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "peft=null", "t=[x,y]"]` → nested dict with YAML-typed values."""
    from omegaconf import OmegaConf

    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ChatftError(
                "config_invalid",
                f"override {item!r} is not of the form key.path=value",
                "write overrides as dotted paths, e.g. step_scheduler.max_steps=20 or peft=null",
            )
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
        except Exception as exc:
            raise ChatftError(
                "config_invalid",
                f"override {item!r} cannot be parsed: {str(exc).splitlines()[0]}",
                "quote values that contain YAML syntax, e.g. 'dataset.chat_template=\"{{ ... }}\"'",
            ) from None
        nested = deep_merge(nested, parsed)
    return nested


def resolve_interpolations(config: dict[str, Any]) -> dict[str, Any]:
    """Resolve `${oc.env:VAR,default}`, `${oc.select:key,default}`, `${chatft.demo_model:}` and plain `${key}`
    references."""
    from omegaconf import OmegaConf

    # `${chatft.demo_model:}`: the demo model `make demo-model` built, else its Hub id (the tiny configs use it)
    OmegaConf.register_resolver("chatft.demo_model", paths.demo_model, replace=True)
    try:
        return OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    except Exception as exc:
        key = getattr(exc, "full_key", None)
        where = f" at `{key}`" if key else ""
        raise ChatftError(
            "config_invalid",
            f"cannot resolve an interpolation{where}: {str(exc).splitlines()[0]}",
            "set the environment variable it reads, or give the interpolation a default: ${oc.env:VAR,default}",
        ) from None


def to_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
