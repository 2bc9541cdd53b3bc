"""Training rows from a dataset config section: read, check as `messages` rows, account for every row.

In: `dataset` / `validation_dataset` (path or Hub id, split, name, num_samples_limit). Out: a
`MessageSource` with the usable rows (1-based row number, `{messages, tools}`), the drop counts with the
first row numbers of each reason, and the data's sha256. The row guards are data prep's own
(`formats.convert_row` with format `messages`), so a file accepted by training and one written by
`chatft prep` obey the same rules.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatft.artifacts import file_sha256
from chatft.data.formats import LIST_FIELDS, RowDropped, convert_row, unfilled_placeholder
from chatft.data.formats import _short as short
from chatft.data.readers import open_source
from chatft.errors import ChatftError

MAX_EXAMPLES = 5


@dataclass
class MessageSource:
    rows: list[tuple[int, dict[str, Any]]]
    rows_in: int
    sha256: str | None
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    changed: Counter[str] = field(default_factory=Counter)  # rows kept but altered (e.g. merged user turns)
    flagged: Counter[str] = field(default_factory=Counter)  # rows kept as they are that look wrong (formats.FLAGS)
    flagged_examples: dict[str, list[int]] = field(default_factory=dict)
    placeholder: str | None = None  # the first unfilled template placeholder seen
    misshapen: str | None = None  # the first row whose `messages` is there but not a list, described

    def drop(self, reason: str, row_number: int) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(row_number)

    def flag(self, reason: str, row_number: int) -> None:
        self.flagged[reason] += 1
        examples = self.flagged_examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(row_number)


def data_sha256(path_or_id: str) -> str | None:
    """sha256 of a local file, or over the sorted files of a folder; None for a Hub dataset (the cache is
    then keyed by nothing stable, so it is not used)."""
    path = Path(path_or_id).expanduser()
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}:{file_sha256(file)}\n".encode())
        return digest.hexdigest()
    return None


def read_message_rows(section: Any, *, key: str = "dataset") -> MessageSource:
    path_or_id = section.path_or_dataset_id
    source = open_source(path_or_id, split=section.split, name=getattr(section, "name", None),
                         limit=section.num_samples_limit)
    result = MessageSource(rows=[], rows_in=0, sha256=data_sha256(path_or_id))
    for row in source.rows:
        result.rows_in += 1
        if row.problem is not None:
            result.drop(row.problem, row.number)
            continue
        if not isinstance(row.value, dict):
            result.drop("not_an_object", row.number)
            continue
        if not isinstance(row.value.get("messages"), list):
            if "messages" in row.value and result.misshapen is None:
                value = row.value["messages"]
                result.misshapen = f"in row {row.number} it is a {type(value).__name__}: {short(value)}"
            result.drop("messages_missing", row.number)
            continue
        try:
            conversation = convert_row(row.value, "messages")
        except RowDropped as dropped:
            result.drop(dropped.reason, row.number)
            continue
        result.changed.update(conversation.changes)
        if (placeholder := unfilled_placeholder(conversation.messages)) is not None:
            result.flag("template_placeholder", row.number)
            result.placeholder = result.placeholder or placeholder
        result.rows.append((row.number, conversation.to_row()))
    if result.rows_in and result.dropped.get("messages_missing") == result.rows_in:
        raise _no_messages(result, key, path_or_id)
    return result


def _no_messages(result: MessageSource, key: str, path_or_id: str) -> ChatftError:
    where = f"{key}.path_or_dataset_id={path_or_id}"
    if result.misshapen is not None:  # the key is there, its value is not a conversation
        shape, example = LIST_FIELDS["messages"]
        return ChatftError(
            "messages_missing",
            f"no row of {where} has a usable `messages`: `messages` must be a list of {shape} objects, but "
            f"{result.misshapen}",
            f'write each row as {{"messages": [{example}, ...]}}',
        )
    return ChatftError(
        "messages_missing",
        f"no row of {where} has a `messages` list",
        f"convert it first: chatft prep {path_or_id} -o {Path(path_or_id).stem}.messages.jsonl, then set "
        f"{key}.path_or_dataset_id={Path(path_or_id).stem}.messages.jsonl",
    )
