"""The README's "A fine-tune in four commands", run as written on a fresh checkout after `make demo-model`:
offline (HF_HUB_OFFLINE=1), with no environment variable to guess. The tiny configs must read the demo model
where scripts/get_demo_model.py writes it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from clirun import run_chatft
from conftest import REPO_ROOT, load_module_from_path

README = REPO_ROOT / "README.md"
SECTION = "## A fine-tune in four commands"


def readme_commands() -> list[list[str]]:
    """The section's shell block, one argv per line, comments dropped."""
    section = README.read_text(encoding="utf-8").split(SECTION, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def chatft(argv: list[str], cwd: Path, *extra: str):
    assert argv[0] == "chatft", argv
    return run_chatft(*argv[1:], *extra, cwd=cwd)


@pytest.fixture
def fresh_checkout(smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working dir where `make demo-model` has run and nothing else: the demo model in chatft's cache (the
    one run_chatft gives this dir, linked to the real conversion), no CHATFT_DEMO_MODEL or CHATFT_RUNS_DIR, and
    the reader's own chats in `my_chats.json`."""
    for var in ("CHATFT_DEMO_MODEL", "CHATFT_RUNS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CHATFT_CACHE_DIR", str(tmp_path / "cache"))  # what run_chatft sets for cwd=tmp_path
    script = load_module_from_path("chatft_get_demo_model", REPO_ROOT / "scripts" / "get_demo_model.py")
    model_dir = script.demo_model_dir()
    model_dir.parent.mkdir(parents=True)
    model_dir.symlink_to(smollm2_dir, target_is_directory=True)
    chats = [{"conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                                {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."}]} for i in range(100)]
    (tmp_path / "my_chats.json").write_text(json.dumps(chats))
    return tmp_path


def test_the_readme_previews_what_it_then_trains():
    _, preview, train, _ = readme_commands()
    assert preview[:2] == ["chatft", "preview"] and train[:2] == ["chatft", "run"]
    assert preview[2] == train[2] == "peft/automodel"
    assert preview[preview.index("-c") + 1] == train[train.index("-c") + 1]


def test_the_readme_commands_find_the_demo_model_offline(fresh_checkout: Path):
    """prep and preview as written; the training command compiled (--dry-run) to the demo model's folder."""
    prep, preview, train, _ = readme_commands()
    done = chatft(prep, fresh_checkout)
    assert done.returncode == 0, done.stderr
    shown = chatft(preview, fresh_checkout)
    assert shown.returncode == 0, shown.stderr
    assert "memory estimate (LoRA" in shown.stdout
    compiled = chatft(train, fresh_checkout, "--dry-run")
    assert compiled.returncode == 0, compiled.stderr
    model_dir = fresh_checkout / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert f"pretrained_model_name_or_path: {model_dir}\n" in compiled.stdout


@pytest.mark.slow
def test_the_readme_fine_tune_runs_as_written(fresh_checkout: Path):
    prep, preview, train, listing = readme_commands()
    for argv in (prep, preview, train):
        done = chatft(argv, fresh_checkout)
        assert done.returncode == 0, done.stderr
    assert listing[0] == "ls"
    final = fresh_checkout / listing[1]
    files = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "chatft_manifest.json", "tokenizer.json"} <= files
