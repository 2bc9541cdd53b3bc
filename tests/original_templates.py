"""The model families' original chat templates, as TRL's wheel (a test extra) ships them as data files."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _trl_templates_dir() -> Path | None:
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "chat_templates"
    return folder if folder.is_dir() else None


TRL_DIR = _trl_templates_dir()
SKIP_REASON = "trl (a test extra) ships the original templates"


def original(name: str) -> str:
    assert TRL_DIR is not None
    return (TRL_DIR / f"{name}.jinja").read_text(encoding="utf-8")
