"""Refusals about a training dataset or a model location as a whole, before any row is read or weight loaded.

In: the `dataset.path_or_dataset_id` of a config. Out: nothing, or a `ChatftError`:
- `dataset_not_found`: a local path that does not exist (Hub ids are checked when they are loaded).
- `packed_parquet_used_with_automodel`: Megatron-Bridge's packed rows (`input_ids` + `loss_mask`, no
  `messages`) in Parquet, or anything under `splits/(train|valid|test)`; chatft trains from the chat JSONL
  those rows were packed from.
In: a model, tokenizer or adapter location (a config key and its value). Out: nothing, or `config_invalid` for a
path that does not exist, or a Hub id with nothing cached while HF_HUB_OFFLINE is set (`check_model_location`).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from chatft.data.locations import looks_like_hub_id, looks_like_path
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


# A split folder's name → the stems its source JSONL usually has (Megatron-Bridge/NeMo name them training.jsonl,
# validation.jsonl, test.jsonl; Hub exports train/valid/test).
SPLIT_STEMS = {"train": ("train", "training"), "valid": ("valid", "validation", "val"),
               "validation": ("validation", "valid", "val"), "test": ("test",)}
PACKING_SUFFIX = re.compile(r"([._-](packed|pack)?[._-]?\d+|[._-]packed)$")  # train_2048, train.packed


def _source_stems(path: Path) -> set[str]:
    """Stems a JSONL may have to be the source of the packed file or folder `path`: the packed file's own stem
    (without a packing suffix such as `_2048`), and the split's stems for files under `splits/<split>/`."""
    stems = set()
    if path.suffix == ".parquet":
        stems |= {path.stem, PACKING_SUFFIX.sub("", path.stem)}
    split = SPLITS_DIR.search(path.as_posix())
    if split:
        stems |= set(SPLIT_STEMS[split.group(2)])
    return stems


def _source_jsonl_candidates(path: Path) -> list[Path]:
    """Chat JSONL files near packed data that plausibly are its source: same stem (`train.parquet` ←
    `train.jsonl`, `splits/train/` ← `training.jsonl`), in its folder or up to three above. Any other JSONL
    nearby (eval results, notes) is not named: a wrong guess sends the user to train on the wrong file."""
    stems = _source_stems(path)
    start = path if path.is_dir() else path.parent
    for ancestor in [start, *start.parents][:4]:
        found = sorted(p for p in ancestor.glob("*.jsonl") if p.stem in stems and not SPLITS_DIR.search(p.as_posix()))
        if found:
            return found[:3]
    return []


def packed_rows_error(columns: Iterable[str], location: str, file: Path | None = None) -> ChatftError | None:
    """The refusal for Megatron-Bridge's packed rows, naming the chat JSONL they were likely packed from.
    `file`: one packed file, when `location` is a folder or a pattern."""
    columns = set(columns)
    if not (PACKED_COLUMNS <= columns and "messages" not in columns):
        return None
    sources = _source_jsonl_candidates(file or Path(location))
    if sources:
        use = f"use the source JSONL ({', '.join(str(p) for p in sources)})"
    else:
        use = ("use the chat JSONL these rows were packed from: the Megatron-Bridge dataset config that packed them "
               "names it (its dataset_root holds training.jsonl / validation.jsonl); packed rows cannot be turned "
               "back into conversations. Without it, convert the raw chat data: chatft prep RAW -o train.jsonl")
    return ChatftError(
        "packed_parquet_used_with_automodel",
        f"{location} holds packed rows ({', '.join(sorted(columns & PACKED_COLUMNS))}, no `messages`): "
        "that is Megatron-Bridge's input format, not chat data",
        f"{use}; chatft tokenizes and masks chat rows itself. To train on the packed files, use Megatron-Bridge "
        "SFT/PEFT instead.",
    )


def refuse_packed_parquet(path_or_glob: str) -> None:
    files = parquet_files(path_or_glob)
    if not files and SPLITS_DIR.search(Path(path_or_glob).as_posix()):
        path = Path(path_or_glob)
        files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())[:1]
    if files and (error := packed_rows_error(_columns(files[0]), path_or_glob, files[0])):
        raise error


def check_dataset_path(path_or_id: str, key: str = "dataset.path_or_dataset_id") -> None:
    """Refuse packed Parquet, patterns, and local paths that do not exist. Hub ids pass through (they are
    refused when loading finds them neither local nor cached)."""
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


# --------------------------------------------------------------------------- model locations


def _nearest_folder(path: Path) -> Path | None:
    return next((parent for parent in path.parents if parent.is_dir()), None)


def hub_cache_dirs() -> list[Path]:
    """Where a Hub model may be cached: huggingface_hub's cache, and the older TRANSFORMERS_CACHE if set."""
    from huggingface_hub import constants

    dirs = [Path(constants.HF_HUB_CACHE)]
    if os.environ.get("TRANSFORMERS_CACHE"):
        dirs.append(Path(os.environ["TRANSFORMERS_CACHE"]))
    return dirs


def hub_model_cached(repo_id: str) -> bool:
    """Whether any snapshot of the Hub model `repo_id` is in the local cache (`models--org--name/snapshots/*`,
    huggingface_hub's cache layout); which files and revision it holds is left to the load to judge."""
    folder = "models--" + repo_id.replace("/", "--")
    return any(any((root / folder / "snapshots").glob("*")) for root in hub_cache_dirs())


def check_model_location(key: str, value: str) -> None:
    """Refuse a model (or tokenizer, adapter) location that cannot load, before transformers is asked.

    A value that can only be a path (`./x`, `/x`, `~/x`, `a/b/c`) and does not exist is named as a missing
    path: transformers would report it as a malformed Hub repo id. A Hub id with nothing cached while
    HF_HUB_OFFLINE is set is refused without a lookup. Any other Hub id is left to transformers (online, it
    may well exist)."""
    from huggingface_hub import constants

    local = Path(value).expanduser()
    if local.exists():
        return
    if looks_like_path(value):
        nearest = _nearest_folder(local.absolute())
        raise ChatftError(
            "config_invalid",
            f"cannot load {key}={value}: the path {local.absolute()} does not exist locally",
            (f"{nearest} exists; " if nearest is not None and nearest != Path(local.absolute().anchor) else "")
            + "check the path (relative paths start at the current folder); a Hub model id is written org/name",
        )
    if constants.HF_HUB_OFFLINE and not hub_model_cached(value):
        raise ChatftError(
            "config_invalid",
            f"cannot load {key}={value}: it is not a local folder ({local.absolute()} does not exist) and not in "
            f"the local Hugging Face cache ({', '.join(map(str, hub_cache_dirs()))}); HF_HUB_OFFLINE=1 forbids "
            "downloading it",
            f"download it once with network access: `hf download {value}`; or give the path of a local "
            "save_pretrained folder",
        )
