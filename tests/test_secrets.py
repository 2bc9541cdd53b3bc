"""Which keys count as secrets."""

import pytest

from chatft.config.secrets import REDACTED, is_secret_key, redact, redact_overrides


@pytest.mark.parametrize("key", ["hf_token", "api_key", "apiKey", "WANDB_API_KEY", "db_password", "client_secret",
                                 "aws_credential", "access-token"])
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["max_new_tokens", "num_tokens", "eos_token", "pad_token", "start_of_turn_token",
                                 "tokenizer", "keep_last", "monkey_patch", "special_tokens"])
def test_not_secret_keys(key):
    assert not is_secret_key(key)


def test_redact_nested_and_overrides():
    assert redact({"a": {"hf_token": "x", "n": [{"api_key": "y"}]}, "b": 1, "api_key": None}) == {
        "a": {"hf_token": REDACTED, "n": [{"api_key": REDACTED}]}, "b": 1, "api_key": None}
    assert redact_overrides(["wandb.api_key=abc", "peft.dim=8", "novalue"]) == [
        f"wandb.api_key={REDACTED}", "peft.dim=8", "novalue"]
