"""A disk cache of tokenized datasets, so a dataset is tokenized once per (data, tokenizer, template,
settings).

In: a key (the sha256 of everything that changes the result) and `PreparedData`. Out: the same
`PreparedData` on the next run. Stored as safetensors (flat arrays + row offsets) and JSON: nothing is
unpickled. Location: `$CHATFT_CACHE_DIR/tokenized/` (default `~/.cache/chatft/tokenized/`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from chatft.data.types import DataReport, PreparedData, TokenizedRow
from chatft import paths

FORMAT_VERSION = 5  # bump when the tokenization, the stored layout or the report's fields change


def cache_root() -> Path:
    return paths.cache_root() / "tokenized"


def cache_key(parts: dict[str, Any]) -> str:
    payload = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _paths(key: str, root: Path) -> tuple[Path, Path]:
    return root / f"{key}.safetensors", root / f"{key}.json"


def load(key: str, root: Path | None = None) -> PreparedData | None:
    from safetensors.numpy import load_file

    tensors_path, meta_path = _paths(key, root or cache_root())
    if not (tensors_path.is_file() and meta_path.is_file()):
        return None
    try:
        arrays = load_file(tensors_path)
        meta = json.loads(meta_path.read_text())
        offsets = arrays["offsets"].tolist()
        ids, mask, sources = arrays["input_ids"], arrays["loss_mask"], arrays["source_row"].tolist()
        messages = [None if number < 0 else number for number in arrays["message"].tolist()]
        report = DataReport(**meta["report"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged entry, or one of another shape, is rebuilt, not trusted
    rows = [
        TokenizedRow(ids[start:end].tolist(), mask[start:end].astype(bool).tolist(), sources[i], messages[i])
        for i, (start, end) in enumerate(zip(offsets[:-1], offsets[1:]))
    ]
    return PreparedData(rows, report)


def save(key: str, data: PreparedData, root: Path | None = None) -> None:
    from safetensors.numpy import save_file

    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    lengths = [len(row) for row in data.rows]
    arrays = {
        "input_ids": np.fromiter((t for row in data.rows for t in row.input_ids), dtype=np.int32, count=sum(lengths)),
        "loss_mask": np.fromiter((m for row in data.rows for m in row.loss_mask), dtype=np.uint8, count=sum(lengths)),
        "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
        "source_row": np.array([row.source_row for row in data.rows], dtype=np.int64),
        "message": np.array([-1 if row.message is None else row.message for row in data.rows], dtype=np.int64),
    }
    tensors_path, meta_path = _paths(key, root)
    # Write both files under temporary names, then rename: readers never see half an entry.
    with tempfile.NamedTemporaryFile(dir=root, suffix=".tmp", delete=False) as tmp:
        tmp_tensors = Path(tmp.name)
    save_file(arrays, tmp_tensors)
    tmp_meta = tmp_tensors.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps({"report": data.report.to_json()}))
    os.replace(tmp_tensors, tensors_path)
    os.replace(tmp_meta, meta_path)
