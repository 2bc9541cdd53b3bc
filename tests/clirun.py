"""The real `chatft` command, run in a subprocess as a user runs it, and the shape of its refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHATFT = str(Path(sys.executable).parent / "chatft")


def run_chatft(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """`chatft ARGS` offline (no test may wait on the network: a Hub id fails fast as "not cached"), with
    its caches inside `cwd` when one is given, so tests never share tokenized data."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if cwd is not None:
        environment |= {"CHATFT_CACHE_DIR": str(Path(cwd) / "cache"), "HF_DATASETS_CACHE": str(Path(cwd) / "hf-cache")}
    return subprocess.run([CHATFT, *args], cwd=cwd, env={**environment, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def assert_error_block(result: subprocess.CompletedProcess, error_id: str) -> str:
    """Exit status 2 and one `error[id]: ...` block with its `  hint:` line (warnings may come first), no
    traceback. Returns stderr."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("error[") == 1 and f"error[{error_id}]: " in result.stderr, result.stderr
    assert "\n  hint: " in result.stderr[result.stderr.index("error["):]
    assert "Traceback" not in result.stderr
    return result.stderr
