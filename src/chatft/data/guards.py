"""Refusals about a training dataset as a whole, before any row is read.

In: the `dataset.path_or_dataset_id` of a config. Out: nothing, or a `ChatftError`:
- `dataset_not_found`: a local path that does not exist (Hub ids are checked when they are loaded).
- `packed_parquet_used_with_automodel`: Megatron-Bridge's packed rows (`input_ids` + `loss_mask`, no
  `messages`) in Parquet, or anything under `splits/(train|valid|test)`; chatft trains from the chat JSONL
  those rows were packed from.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterable
from pathlib import Path

from chatft.errors import ChatftError

PACKED_COLUMNS = {"input_ids", "loss_mask"}
SPLITS_DIR = re.compile(r"(^|/)splits/(train|valid|validation|test)(/|$)")
GLOB_CHARS = re.compile(r"[*?\[]")


def parquet_files(path_or_glob: str) -> list[Path]:
    if GLOB_CHARS.search(path_or_glob):
        return sorted(Path(p) for p in glob.glob(path_or_glob, recursive=True) if p.endswith(".parquet"))
    path = Path(path_or_glob)
    if path.is_dir():
        return sorted(path.rglob("*.parquet"))
    return [path] if path.suffix == ".parquet" and path.is_file() else []


def _columns(file: Path) -> set[str]:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(file).names)
    with file.open("rt", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return set()
                return set(row) if isinstance(row, dict) else set()
    return set()


def _source_jsonl_candidates(path: Path) -> list[Path]:
    """Chat JSONL files near packed data: the likely source it was packed from."""
    start = path if path.is_dir() else path.parent
    for ancestor in [start, *start.parents][:4]:
        found = sorted(p for p in ancestor.glob("*.jsonl") if not SPLITS_DIR.search(p.as_posix()))
        if found:
            return found[:3]
    return []


def packed_rows_error(columns: Iterable[str], location: str) -> ChatftError | None:
    """The refusal for Megatron-Bridge's packed rows, naming the chat JSONL they were likely packed from."""
    columns = set(columns)
    if not (PACKED_COLUMNS <= columns and "messages" not in columns):
        return None
    sources = _source_jsonl_candidates(Path(location))
    named = ", ".join(str(p) for p in sources) if sources else "the chat JSONL these rows were packed from"
    return ChatftError(
        "packed_parquet_used_with_automodel",
        f"{location} holds packed rows ({', '.join(sorted(columns & PACKED_COLUMNS))}, no `messages`): "
        "that is Megatron-Bridge's input format, not chat data",
        f"use the source JSONL ({named}); chatft tokenizes and masks chat rows itself. To train on the "
        "packed files, use Megatron-Bridge SFT/PEFT instead.",
    )


def refuse_packed_parquet(path_or_glob: str) -> None:
    files = parquet_files(path_or_glob)
    if not files and SPLITS_DIR.search(Path(path_or_glob).as_posix()):
        path = Path(path_or_glob)
        files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())[:1]
    if files and (error := packed_rows_error(_columns(files[0]), path_or_glob)):
        raise error


def check_dataset_path(path_or_id: str, key: str = "dataset.path_or_dataset_id") -> None:
    """Refuse packed Parquet, patterns, and local paths that do not exist. Hub ids pass through (they are
    refused when loading finds them neither local nor cached)."""
    from chatft.data.readers import looks_like_hub_id

    if GLOB_CHARS.search(path_or_id):
        if not glob.glob(path_or_id, recursive=True):
            raise ChatftError("dataset_not_found", f"{key}={path_or_id} matches no file",
                              "give the file or directory itself")
        refuse_packed_parquet(path_or_id)
        raise ChatftError("config_invalid", f"{key}={path_or_id} is a pattern",
                          "give one file, or a directory holding the data files")
    if not Path(path_or_id).expanduser().exists() and not looks_like_hub_id(path_or_id):
        raise ChatftError(
            "dataset_not_found",
            f"{key}={path_or_id} does not exist",
            "give a chat JSONL file or a directory of them (relative paths start at the current directory), "
            "or a Hugging Face dataset id",
        )
    refuse_packed_parquet(path_or_id)
