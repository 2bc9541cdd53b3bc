"""Where a step may write: never onto one of its inputs, nor inside one, and (for a step that replaces its whole
output dir) never around one either.

In: the output's config key and value, and the step's inputs as (description, local path or None). Out: the
refusal `output_path_overlaps_inputs`, or the output, resolved. Also what an output dir already holds besides
the job.yaml `chatft run` writes there first. Torch-free: steps call these in their preflight, before `chatft run`
writes job.yaml into the output (it would land in an overlapping input).

Used by convert/merge_lora (its output replaces the dir: no overlap at all) and eval/model_eval (it only adds
its two files, so an output_dir that holds an input is fine).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from chatft.errors import ChatftError
from chatft.run_layout import JOB_FILE


def overlap(output: Path, path: Path) -> str | None:
    """How `output` overlaps `path` ("is", "sits inside" or "contains"), or None. Both resolved."""
    if output == path:
        return "is"
    if output.is_relative_to(path):
        return "sits inside"
    if path.is_relative_to(output):
        return "contains"
    return None


def check_output_path(key: str, value: str | Path, inputs: Iterable[tuple[str, Path | None]], hint: str, *,
                      may_contain_inputs: bool = False) -> Path:
    """Refuse an output that is one of `inputs` or sits inside one (writing there would change that artifact),
    and, unless `may_contain_inputs`, one that contains an input (replacing the output would delete it).
    `inputs` name each path the way the message should ("the adapter dir /runs/peft/final"); None is skipped.
    Returns the output, resolved."""
    output = Path(value).expanduser().resolve()
    for name, path in inputs:
        if path is None:
            continue
        relation = overlap(output, path.expanduser().resolve())
        if relation is None or (relation == "contains" and may_contain_inputs):
            continue
        raise ChatftError("output_path_overlaps_inputs", f"{key}={value} {relation} {name}", hint)
    return output


def held_entries(directory: Path) -> list[str]:
    """What a dir holds, apart from the job.yaml `chatft run` writes there before the step starts (sorted)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name != JOB_FILE)


def file_in_the_way(directory: Path) -> Path | None:
    """The regular file (or other non-folder) at `directory` or above it that stops it being created."""
    for candidate in (directory, *directory.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def refuse_file_in_the_way(directory: Path, key: str, value: str) -> None:
    """The refusal for an output folder that cannot be created (`key=value` named it), instead of the
    FileExistsError/NotADirectoryError that `mkdir` would raise."""
    if (blocking := file_in_the_way(directory)) is not None:
        raise ChatftError(
            "config_invalid",
            f"{key}={value} needs the folder {directory}, but {blocking.resolve()} is a file, not a folder",
            f"choose another {key}, or move {blocking} out of the way",
        )
