"""Source rows for data prep: a JSONL, JSON-array or Parquet file (gzip allowed), or a Hugging Face dataset.

In: data prep's `input` (a path, or a Hub dataset id), with `split`, `name` and `limit`.
Out: a `Source` naming what was opened and yielding `SourceRow`s: a 1-based row number, the decoded value,
or, for a JSONL line that is not JSON, the reason (`invalid_json`) and the raw text. Whether a value is a
usable row is decided later (formats.py); this module only reads.

What a file is comes from its first bytes, not its name: gzip and Parquet by their magic bytes, then a JSON
array when the text starts with `[`, JSON Lines otherwise. JSONL and Parquet stream; a JSON array is read
whole (the standard library has no streaming JSON parser). A directory or a Hub id goes through
`datasets.load_dataset`, with `split` (slices allowed) and the config `name`.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any

from chatft.data.guards import packed_rows_error
from chatft.data.locations import looks_like_hub_id
from chatft.errors import ChatftError

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
SNIFF_BYTES = 64 * 1024
SNIPPET_CHARS = 160


@dataclass(frozen=True)
class SourceRow:
    """One row as read: `value` is the decoded row, or None when `problem` says why it could not be."""

    number: int  # 1-based: the line number in a JSONL file, the position everywhere else
    value: Any = None
    problem: str | None = None  # "invalid_json" | "not_utf8"
    snippet: str = ""  # the raw text of an undecodable line, shortened
    detail: str = ""  # where in the line it went wrong


@dataclass
class Source:
    """An opened input: what it is and its rows (an iterator, read once)."""

    input: str
    kind: str  # "jsonl" | "json" | "parquet" | "dataset_dir" | "hub"
    compressed: bool
    split: str | None
    rows: Iterator[SourceRow]

    @property
    def row_label(self) -> str:
        """What a row number counts: JSONL rows are named by line so an editor can jump to them."""
        return "line" if self.kind == "jsonl" else "row"


def open_source(input: str, *, split: str | None = None, name: str | None = None,
                limit: int | None = None) -> Source:
    """Open `input` and return its rows (the first `limit` of them when set), or raise a ChatftError."""
    path = Path(input).expanduser()
    if path.is_dir():
        return _open_dataset(str(path), split, name, limit, kind="dataset_dir")
    if path.is_file():
        if split is not None or name is not None:
            raise ChatftError(
                "config_invalid",
                f"split/name apply to a dataset folder or a Hub dataset id, but {input} is a file",
                "drop split= and name=; to read only the first rows of a file use limit=N",
            )
        return _open_file(path, input, limit)
    if looks_like_hub_id(input):
        return _open_dataset(input, split, name, limit, kind="hub")
    raise ChatftError(
        "dataset_not_found",
        f"input {input} does not exist (resolved to {path.resolve()})",
        "check the path, e.g. input=data/raw.jsonl, or give a Hub dataset id like org/name with split=train",
    )


# --------------------------------------------------------------------------- files


def _open_file(path: Path, input: str, limit: int | None) -> Source:
    try:
        with path.open("rb") as raw:
            head = raw.read(4)
    except OSError as exc:
        raise ChatftError("config_invalid", f"input {input} cannot be read ({exc.strerror})",
                          "check the file's permissions") from None
    compressed = head.startswith(GZIP_MAGIC)
    if head == PARQUET_MAGIC:
        return Source(input, "parquet", False, None, _limited(_parquet_rows(path, input), limit))
    sniff = _sniff(path, compressed, input)
    if sniff.startswith(PARQUET_MAGIC):
        raise ChatftError(
            "config_invalid",
            f"{input} is a gzip-compressed Parquet file, which cannot be read in place",
            f"decompress it first (gunzip -k {input}) and pass the .parquet file",
        )
    if b"\x00" in sniff:
        raise ChatftError(
            "config_invalid",
            f"{input} is not UTF-8 text (a binary file, or UTF-16), nor Parquet",
            "export the data as UTF-8 JSONL (one JSON object per line), a JSON array, or Parquet",
        )
    first = sniff.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[":
        return Source(input, "json", compressed, None, _limited(_json_array_rows(path, compressed, input), limit))
    if first == b"{":
        _refuse_single_object(path, compressed, input)
    return Source(input, "jsonl", compressed, None, _limited(_jsonl_rows(path, compressed, input), limit))


def _open_binary(path: Path, compressed: bool) -> IO[bytes]:
    return gzip.open(path, "rb") if compressed else path.open("rb")


def _sniff(path: Path, compressed: bool, input: str) -> bytes:
    """The first bytes of the (decompressed) content."""
    try:
        with _open_binary(path, compressed) as handle:
            return handle.read(SNIFF_BYTES)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        # A short gzip file can already end inside the first block: nothing of it is readable.
        raise _corrupt_gzip(input, exc, None) from None


def _corrupt_gzip(input: str, exc: BaseException, last_line: int | None) -> ChatftError:
    where = f" after line {last_line}" if last_line else ""
    return ChatftError(
        "bad_row",
        f"{input} is a truncated or corrupt gzip file: reading stopped{where} ({exc})",
        "re-create or re-download the file; `gzip -t FILE` checks it",
    )


def _limited(rows: Iterator[SourceRow], limit: int | None) -> Iterator[SourceRow]:
    return rows if limit is None else islice(rows, limit)


def _snippet(text: str) -> str:
    text = text.strip()
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 3] + "..."


def _jsonl_rows(path: Path, compressed: bool, input: str) -> Iterator[SourceRow]:
    """One row per non-blank line; blank lines are not rows, but they still count for line numbers."""
    number = 0
    offset = 0  # of the line's first byte in the (decompressed) file
    try:
        with _open_binary(path, compressed) as handle:
            for number, raw in enumerate(handle, start=1):
                start, offset = offset, offset + len(raw)
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM some editors write
                    raw, start = raw[3:], 3
                if raw.strip():
                    yield _jsonl_row(number, raw, start)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _corrupt_gzip(input, exc, number) from None


def _jsonl_row(number: int, raw: bytes, start: int) -> SourceRow:
    # Decoded apart from parsing: a line in another encoding (latin-1, cp1252) is fine JSON in the wrong
    # encoding, and the fix (iconv) is not the fix for broken JSON.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return SourceRow(number, problem="not_utf8", snippet=_snippet(raw.decode("utf-8", "replace")),
                         detail=f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} (file offset "
                                f"{start + exc.start}) is not UTF-8")
    try:
        return SourceRow(number, json.loads(text))
    except json.JSONDecodeError as exc:
        return SourceRow(number, problem="invalid_json", snippet=_snippet(text),
                         detail=f"the line is not valid JSON: {exc.msg} at column {exc.colno}")


def not_utf8_hint(input: str) -> str:
    """How to convert a file that is not UTF-8 (latin-1 is the usual culprit; `file -i` names the real one)."""
    path = Path(input)
    copy = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return (f"convert the file to UTF-8 and use the copy: iconv -f latin1 -t utf-8 {input} > {copy} "
            f"(latin1 is a guess: `file -i {input}` names the encoding, e.g. cp1252 or utf-16)")


def _read_text(path: Path, compressed: bool, input: str) -> str:
    try:
        with _open_binary(path, compressed) as handle:
            data = handle.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _corrupt_gzip(input, exc, None) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ChatftError(
            "bad_row",
            f"{input} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} (file offset {exc.start}) "
            "cannot be decoded",
            not_utf8_hint(input),
        ) from None


def _parse_document(text: str, input: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # An unterminated string or an error at the very end means the file was cut short.
        truncated = exc.msg.startswith("Unterminated") or exc.pos >= len(text.rstrip()) - 1
        raise ChatftError(
            "bad_row",
            f"{input} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}, char {exc.pos})"
            + ("; the file looks truncated" if truncated else ""),
            "fix the file at that position (or re-export it); JSON Lines files are read line by line instead",
        ) from None


def _json_array_rows(path: Path, compressed: bool, input: str) -> Iterator[SourceRow]:
    document = _parse_document(_read_text(path, compressed, input), input)
    if not isinstance(document, list):  # `[` was sniffed, so only a scalar-looking file gets here
        raise ChatftError("config_invalid", f"{input} does not hold a JSON array of rows",
                          "write the rows as a JSON array or as JSON Lines")
    for number, value in enumerate(document, start=1):
        yield SourceRow(number, value)


def _refuse_single_object(path: Path, compressed: bool, input: str) -> None:
    """A file starting with `{` is JSONL unless its first line is not JSON and the whole file is one object."""
    with _open_binary(path, compressed) as handle:
        first_line = handle.readline()
    try:
        json.loads(first_line)
        return
    except ValueError:
        pass
    try:
        document = json.loads(_read_text(path, compressed, input))
    except (ValueError, ChatftError):
        return  # not one document either: JSONL with bad lines, counted row by row
    if isinstance(document, dict):
        keys = ", ".join(list(document)[:10])
        raise ChatftError(
            "config_invalid",
            f"{input} holds one JSON object (keys: {keys}), not rows",
            "write the rows as a JSON array or as JSON Lines; if they sit under one key, extract them, "
            "e.g. jq -c '.data[]' FILE > rows.jsonl",
        )


def _parquet_rows(path: Path, input: str) -> Iterator[SourceRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ChatftError("bad_row", f"{input} is not a readable Parquet file ({exc})",
                          "re-create the file, or export the data as JSONL") from None
    _refuse_packed(parquet.schema_arrow.names, input)
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            number += 1
            yield SourceRow(number, value)


def _refuse_packed(columns: list[str], input: str) -> None:
    if (error := packed_rows_error(columns, input)) is not None:
        raise error


# --------------------------------------------------------------------------- datasets (folder or Hub id)


def _open_dataset(input: str, split: str | None, name: str | None, limit: int | None, kind: str) -> Source:
    dataset, split = _load_dataset(input, split, name)
    _refuse_packed(list(dataset.column_names), input)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    rows = (SourceRow(number, value) for number, value in enumerate(dataset, start=1))
    return Source(input, kind, False, split, rows)


def _load_dataset(input: str, split: str | None, name: str | None) -> tuple[Any, str]:
    """`datasets.load_dataset` with its failures turned into chatft errors. Out: (Dataset, the split used)."""
    import datasets
    from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError

    try:
        loaded = datasets.load_dataset(input, name=name, split=split)
    except DatasetNotFoundError as exc:
        raise ChatftError(
            "dataset_not_found",
            f"{input} is neither a local file or folder nor a dataset on the Hugging Face Hub ({exc})",
            "check the id (org/name) or the path; a private or gated dataset needs `hf auth login` first",
        ) from None
    except ConnectionError:  # offline (HF_HUB_OFFLINE=1) or no network, and nothing cached
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise ChatftError(
            "dataset_not_found",
            f"{input} is not a local file or folder, and the Hub dataset {input} is not cached ({why})",
            f"fetch it once with network access (without HF_HUB_OFFLINE=1), e.g. `chatft prep {input} --split train "
            "-o data/train.jsonl`, or pass a local path",
        ) from None
    except FileNotFoundError as exc:  # a folder with no data files, or a data file pattern that matches nothing
        raise ChatftError("dataset_not_found", f"{input}: {exc}",
                          "point input at a folder with .jsonl/.json/.parquet files, or at one file") from None
    except ValueError as exc:
        if re.search(r"split|config", str(exc), re.IGNORECASE):  # datasets' message lists the choices
            raise ChatftError("config_invalid", f"{input}: {exc}",
                              "pass one of the choices it lists, e.g. split=train or name=<config>") from None
        raise _unreadable_dataset(input, exc) from None
    except DatasetGenerationError as exc:
        raise _unreadable_dataset(input, exc.__cause__ or exc) from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, input)
    return loaded, split or ""


def _unreadable_dataset(input: str, exc: BaseException) -> ChatftError:
    return ChatftError(
        "bad_row",
        f"{input} could not be read as a dataset ({type(exc).__name__}: {exc})",
        "pass its data file itself as input: chatft reads JSONL line by line and counts the lines it cannot use "
        "(load_dataset also fails on blank lines in JSONL)",
    )


def _pick_split(splits: Any, input: str) -> tuple[Any, str]:
    """No split given: the only split, else `train`; anything else must be named."""
    names = list(splits)
    if len(names) == 1 or "train" in names:
        chosen = names[0] if len(names) == 1 else "train"
        return splits[chosen], chosen
    raise ChatftError("config_invalid", f"{input} has splits {', '.join(names)} and none was chosen",
                      f"pass one, e.g. --split {names[0]} (split={names[0]})")
