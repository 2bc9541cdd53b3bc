"""Secrets never reach a terminal or a file: values of keys named like secrets print as ******."""

from __future__ import annotations

import re
from typing import Any

SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")
# Whole words that make a key secret: the markers, their plurals, and common run-together spellings.
SECRET_WORDS = {*SECRET_MARKERS, "SECRETS", "CREDENTIALS", "APIKEY", "AUTHTOKEN", "ACCESSTOKEN", "HFTOKEN", "PASSWD"}
REDACTED = "******"
# Tokenizer settings say TOKEN without being secrets (`eos_token`, `start_of_turn_token`).
TOKENIZER_TOKEN_KEY = re.compile(r"(^|_)(eos|bos|pad|unk|sep|cls|mask|turn|special)_tokens?$", re.IGNORECASE)


def is_secret_key(key: Any) -> bool:
    """`hf_token`, `wandb.api_key`, `apiKey`, `DB_PASSWORD` are secrets; `max_new_tokens`, `eos_token` and
    `monkey_patch` are not. Matched on whole words of the key (snake, kebab or camel case)."""
    if TOKENIZER_TOKEN_KEY.search(str(key)):
        return False
    words = re.split(r"[^A-Za-z0-9]+|(?<=[a-z])(?=[A-Z])", str(key))
    return any(word.upper() in SECRET_WORDS for word in words)


def redact(value: Any) -> Any:
    """A copy with the values of secret-looking keys replaced by ******."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(k) and v is not None else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def redact_overrides(overrides: list[str]) -> list[str]:
    """`wandb.api_key=...` on the command line is a secret too."""
    redacted = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        redacted.append(f"{key}={REDACTED}" if sep and is_secret_key(key.rsplit(".", 1)[-1]) else item)
    return redacted
