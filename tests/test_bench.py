"""bench/run.py end to end at toy size, on a tiny random model: every system runs, the report is consistent
with itself, and the systems that are meant to train the same tokens in the same order really do.

Each run starts one process per system (importing torch, transformers and TRL), so the two runs here take
most of a minute on two cores; the numbers they time are meaningless, what they count is checked exactly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("trl")

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "bench" / "run.py"
CPU_PEERS = ["trl", "trl-packed", "trl-padding-free"]
# Systems that pad or flatten the same rows differently but must train identical tokens in identical order.
SAME_TOKENS = ["chatft", "trl", "trl-padding-free"]


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, **(env or {})})


def run_bench(workload: str, peers: list[str], model: Path, out: Path, *extra: str) -> dict[str, Any]:
    args = ["--workload", workload, "--quick", "--steps", "2", "--warmup", "1", "--model", str(model),
            "--peers", ",".join(peers), "--out", str(out), *extra]
    proc = bench(*args, env={"CHATFT_BENCH_DATA": str(out / "bench-data")})  # not the user's cache
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads((out / f"{workload}.json").read_text())
    assert report["partial"] is False and report["failures"] == {}
    return report


@pytest.fixture(scope="module")
def cpu_lora(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench-cpu")
    return run_bench("cpu-smollm-lora", CPU_PEERS, tiny_model_dir, out), out


def test_every_system_ran_and_measured(cpu_lora):
    report, _ = cpu_lora
    assert list(report["systems"]) == ["chatft", *CPU_PEERS]
    for name, system in report["systems"].items():
        for key in ("tokens_per_s", "supervised_tokens_per_s", "flops_per_s", "mfu", "peak_mem_mb"):
            assert system[key] > 0, (name, key)
        assert math.isclose(system["mfu"] * system["peak_flops"], system["flops_per_s"], rel_tol=1e-9)
        losses = system["repeats"][0]["losses"]
        assert len(losses) == 2 and all(loss is not None and math.isfinite(loss) for loss in losses), (name, losses)
        assert math.isfinite(system["final_loss"])
        assert system["trainable_params"] == report["model_counts"]["lora_params"], name


def test_ratios_are_chatft_over_each_system(cpu_lora):
    report, _ = cpu_lora
    systems = report["systems"]
    chatft = systems["chatft"]
    assert report["ratio"] == pytest.approx(chatft["tokens_per_s"] / systems["trl"]["tokens_per_s"])
    assert set(report["ratios"]) == set(CPU_PEERS)
    for peer in CPU_PEERS:
        ratios = report["ratios"][peer]
        assert ratios["tokens_per_s"] == pytest.approx(chatft["tokens_per_s"] / systems[peer]["tokens_per_s"])
        assert ratios["supervised_tokens_per_s"] == pytest.approx(
            chatft["supervised_tokens_per_s"] / systems[peer]["supervised_tokens_per_s"])
        assert ratios["peak_mem"] == pytest.approx(chatft["peak_mem_mb"] / systems[peer]["peak_mem_mb"])


def test_matched_systems_train_the_same_tokens_in_the_same_order(cpu_lora):
    report, _ = cpu_lora
    systems = report["systems"]
    digests = {name: systems[name]["tokens_sha256"] for name in SAME_TOKENS}
    assert len(set(digests.values())) == 1, digests
    step_tokens = {name: systems[name]["repeats"][0]["step_tokens"] for name in SAME_TOKENS}
    assert len({tuple(v) for v in step_tokens.values()}) == 1, step_tokens
    assert all(n == 4 for n in systems["chatft"]["repeats"][0]["step_conversations"])
    # Every count above is the harness's own; each system's own log of what it fed the model must agree.
    for name, system in systems.items():
        assert system["logged_tokens_match"], name
    assert any("identical tokens: chatft, trl, trl-padding-free" in note for note in report["notes"])


def test_padded_and_padding_free_trl_start_from_the_same_loss(cpu_lora):
    # Same rows and the same initial model (LoRA B=0): a padding-free row that let one conversation see
    # another would change the step-1 loss.
    systems = cpu_lora[0]["systems"]
    padded, flat = (systems[name]["repeats"][0]["losses"][0] for name in ("trl", "trl-padding-free"))
    assert flat == pytest.approx(padded, rel=1e-4)


def test_trl_packing_fills_its_packs(cpu_lora):
    report, _ = cpu_lora
    packed, chatft = report["systems"]["trl-packed"], report["systems"]["chatft"]
    max_length = report["settings"]["max_length"]
    # Four packs of up to max_length tokens per step, holding more conversations than chatft's four rows.
    assert packed["conversations_per_step"] > chatft["conversations_per_step"]
    assert all(t <= 4 * max_length for t in packed["repeats"][0]["step_tokens"])
    assert packed["tokens_sha256"] != chatft["tokens_sha256"]
    assert any(note.startswith("trl-packed trains other conversations per step") for note in report["notes"])


def test_markdown_report_has_one_row_per_system(cpu_lora):
    report, out = cpu_lora
    lines = (out / "cpu-smollm-lora.md").read_text().splitlines()
    assert lines[0].startswith("Device: cpu") and "Command: `python bench/run.py --workload cpu-smollm-lora" in lines[0]
    assert "trl 1." in lines[0]
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| system")]
    assert [row.split("|")[1].strip() for row in rows] == list(report["systems"])


def test_gpu_workload_runs_at_toy_size(tiny_model_dir: Path, tmp_path: Path):
    # The synthetic rows made ahead by --prepare-data (what bench/device/kit.sh does on a machine without a GPU)
    # are the ones the run then finds in the cache.
    cache = tmp_path / "bench-data"
    made = bench("--workload", "gpu-small-full", "--quick", "--prepare-data", "--steps", "2", "--peers",
                 "trl,chatft-packed", "--model", str(tiny_model_dir), env={"CHATFT_BENCH_DATA": str(cache)})
    assert made.returncode == 0, made.stderr[-3000:]
    assert "gpu-small-full: 32 rows (trl-packed pool: 0)" in made.stdout
    # gpu-small-full keeps every activation by default; the override reaches every system alike
    report = run_bench("gpu-small-full", ["trl", "chatft-packed"], tiny_model_dir, tmp_path,
                       "--activation-checkpointing", "on")
    entries = list(cache.iterdir())
    assert len(entries) == 1, entries  # the run's key is the one --prepare-data made: no second entry
    rows = (tmp_path / "gpu-small-full.work" / "rows.jsonl").read_bytes()
    assert rows == (entries[0] / "rows.jsonl").read_bytes()
    assert report["settings"]["data"] == json.loads((entries[0] / "prepared.json").read_text())["info"]
    assert {"workload", "device", "versions", "settings", "systems", "ratio", "ratios", "notes"} <= set(report)
    settings = report["settings"]
    assert settings["activation_checkpointing"] is True
    assert all(system["checks"]["activation_checkpointing"] for system in report["systems"].values())
    assert settings["quick"] and settings["model_shape"]["architecture"] == "qwen2"
    assert settings["model_shape"]["layers"] == 2
    assert settings["max_length"] == 256 and settings["global_batch"] == 16
    if settings["device"] == "cpu":
        assert settings["dtype"] == "float32"
    systems = report["systems"]
    assert list(systems) == ["chatft", "trl", "chatft-packed"]
    # Packs of whole consecutive conversations: the same tokens in the same order as one row per conversation.
    assert len({systems[name]["tokens_sha256"] for name in ("chatft", "trl", "chatft-packed")}) == 1
    assert systems["chatft-packed"]["repeats"][0]["losses"][0] == pytest.approx(
        systems["chatft"]["repeats"][0]["losses"][0], rel=1e-4)
    assert report["ratio"] == pytest.approx(systems["chatft"]["tokens_per_s"] / systems["trl"]["tokens_per_s"])
    assert set(report["ratios"]) == {"trl", "chatft-packed"}
    assert (tmp_path / "gpu-small-full.md").exists()
    # chatft's own memory estimate is set against the peak it reached
    for name in ("chatft", "chatft-packed"):
        assert systems[name]["checks"]["memory_estimate_mb"] > 0
        assert sum(note.startswith(f"{name} memory estimate") for note in report["notes"]) == 1


def test_a_failing_system_leaves_the_others_measured(tiny_model_dir: Path, tmp_path: Path):
    """A worker that fails is reported and not retried; the other systems still run and are written up, and the
    exit status says it failed."""
    args = ["--workload", "cpu-smollm-lora", "--quick", "--steps", "2", "--warmup", "1", "--repeats", "2",
            "--model", str(tiny_model_dir), "--peers", "trl", "--out", str(tmp_path)]
    profiles = tmp_path / "profiles"
    proc = bench(*args, env={"CHATFT_BENCH_FAIL": "trl", "CHATFT_BENCH_PROFILE": str(profiles)})
    assert proc.returncode != 0 and "1 system(s) failed: trl" in proc.stderr
    # CHATFT_BENCH_PROFILE: each worker that trained leaves where its training steps' time went
    assert [p.name for p in profiles.iterdir()] == ["cpu-smollm-lora-chatft-profile.txt"]
    profile = (profiles / "cpu-smollm-lora-chatft-profile.txt").read_text()
    assert "window of training steps" in profile and "\nmatmul " in profile and "aten::mm" in profile
    report = json.loads((tmp_path / "cpu-smollm-lora.json").read_text())
    assert list(report["systems"]) == ["chatft"] and len(report["systems"]["chatft"]["repeats"]) == 2
    assert report["partial"] is False and report["ratio"] is None
    assert "failing on purpose" in report["failures"]["trl"]
    assert sum(note.startswith("FAILED: trl repeat 0 failed") for note in report["notes"]) == 1
    assert not list(tmp_path.glob("cpu-smollm-lora.work/trl_r1.*"))  # not tried again


def test_build_model_only_builds_the_random_model(tiny_model_dir: Path, tmp_path: Path):
    proc = bench("--workload", "gpu-8b-lora", "--quick", "--build-model", "--model", str(tiny_model_dir),
                 "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = Path(proc.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    assert built.parent == tmp_path / "gpu-8b-lora.work" / "model"
    config = json.loads((built / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    assert (built / "BENCH_MODEL.json").exists() and (built / "model.safetensors").exists()
    assert (built / "tokenizer_config.json").exists()
    refused = bench("--workload", "cpu-smollm-lora", "--build-model")
    assert refused.returncode != 0 and "for the gpu-* workloads" in refused.stderr


def test_loss_head_script_compares_both_heads():
    """bench/loss_head.py at one layer: both heads run and give the same summed loss."""
    outputs = {}
    for head in ("logits", "chunked"):
        cmd = [sys.executable, str(REPO_ROOT / "bench" / "loss_head.py"), "--head", head, "--layers", "1",
               "--conversations", "2", "--length", "48"]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = proc.stdout.strip().splitlines()[-1]
        assert line.startswith(f"head {head} on ") and "96 tokens, 64 supervised" in line and "peak memory" in line
        outputs[head] = float(line.split("summed loss ")[1].split(",")[0])
    assert outputs["chunked"] == pytest.approx(outputs["logits"], rel=1e-5)
