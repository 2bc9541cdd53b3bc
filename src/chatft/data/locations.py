"""Is a value a local path or a Hugging Face Hub id? One answer for data, models and the planner.

A Hub id is `name` or `org/name`; anything else (`./x`, `/x`, `~/x`, `runs/sft/final`, `a\\b`) can only be a path.
A value of the Hub's form that ends like a data file (`train.jsonl`) is meant as a file.
"""

from __future__ import annotations

import re
from pathlib import Path

# Names that are clearly meant as local files: if such a path does not exist it is a typo, not a Hub id.
FILE_SUFFIXES = {".json", ".jsonl", ".ndjson", ".gz", ".parquet", ".pq", ".csv", ".tsv", ".txt", ".arrow"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.fullmatch(text)) and Path(text).suffix.lower() not in FILE_SUFFIXES


def looks_like_path(text: str) -> bool:
    """A value that can only mean a local path: anything not of the Hub's `name` / `org/name` form. So `./x`,
    `../x`, `/x`, `~/x`, `a\\b` and `runs/sft/final` (two slashes) are paths; `org/name` and `gpt2` may be either."""
    return not HUB_ID.fullmatch(text)
