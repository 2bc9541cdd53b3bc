"""Training on two processes through the real CLI (`--nproc-per-node 2`: torchrun's engine, gloo on CPU) trains
what one process trains: the same conversations per step, the loss divided by the supervised tokens of the whole
step, the gradients added across processes, with the weights copied to each (ddp) or split across them (fsdp2,
the default for full SFT). Per-step loss and final weights agree within float32 rounding; a
checkpoint written at one world size resumes at the other; two "nodes" (two launchers meeting at a rendezvous on
127.0.0.1) train what one process trains; a refusal reaches the console once; a killed process becomes one
`error[process_failed]`, and running the same command again resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from clirun import CHATFT, assert_error_block, run_chatft
from safetensors.torch import load_file

# 17 rows: a step of 8 rows, another, then one row alone, which leaves the second process without rows in that step.
ROWS = [{"messages": [{"role": "user", "content": f"Spell {word} backwards, then count to {i}."},
                      {"role": "assistant", "content": f"{word[::-1]}. " + " ".join(str(n) for n in range(i + 1))}]}
        for i, word in enumerate("apple river stone cloud ember frost grove harbor island jungle kettle lantern "
                                 "meadow nectar orchard pepper quartz".split())]
TOLERANCE = 1e-5
STEP = {"full": "sft/automodel", "lora": "peft/automodel"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("distributed")
    (directory / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (directory / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[:5]))
    return directory


def command(model: Path, kind: str, run: str, nproc: int, *overrides: str) -> list[str]:
    processes = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    return ["run", STEP[kind], "-c", "tiny", f"model.pretrained_model_name_or_path={model}",
            "dataset.path_or_dataset_id=train.jsonl", f"checkpoint.checkpoint_dir={run}", "model.torch_dtype=float32",
            "step_scheduler.global_batch_size=8", "step_scheduler.local_batch_size=2", "step_scheduler.max_steps=null",
            "step_scheduler.num_epochs=1", "step_scheduler.val_every_steps=null", "optimizer.lr=1e-3",
            *(["peft.dropout=0"] if kind == "lora" else []), *overrides, *processes]


def train(work: Path, model: Path, kind: str, run: str, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    result = run_chatft(*command(model, kind, run, nproc, *overrides), cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    final = run_dir / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(final / name))


def assert_same_training(one: Path, two: Path) -> None:
    first, second = losses(one), losses(two)
    assert len(first) == len(second) == 3
    assert max(abs(a - b) for a, b in zip(first, second)) < TOLERANCE, (first, second)
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < TOLERANCE, f"final weights differ by {worst}"


LAYOUTS = {
    "padding-free": (),
    "padded": ("packed_sequence.padding_free=false",),
    "token-budget": ("packed_sequence.packed_sequence_size=160", "dataset.seq_length=128"),
}


# The default strategy (auto) shards full SFT (fsdp2) and replicates LoRA (ddp); each kind also runs the other one.
# Every case has a step whose single row leaves the second process without rows (empty passes under FSDP2).
@pytest.mark.parametrize("kind,layout,strategy", [("full", "padding-free", "fsdp2"), ("full", "padded", "ddp"),
                                                  ("lora", "padding-free", "ddp"), ("lora", "token-budget", "fsdp2")])
def test_two_processes_train_what_one_trains(work, tiny_model_dir, kind, layout, strategy):
    name = f"{kind}-{layout}"
    settings = LAYOUTS[layout]
    train(work, tiny_model_dir, kind, f"{name}-1", 1, *settings)
    result = train(work, tiny_model_dir, kind, f"{name}-2", 2, *settings, f"distributed.strategy={strategy}")
    assert_same_training(work / f"{name}-1", work / f"{name}-2")
    assert result.stdout.count("done: 3 steps") == 1  # rank 0 alone speaks
    assert ("FSDP2: weights, gradients and optimizer states split over 2 processes" in result.stdout) == (
        strategy == "fsdp2")
    manifest = json.loads((work / f"{name}-2" / "final" / "chatft_manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["launcher"] == "torchrun"
    by_rank = manifest["metrics"]["peak_mem_mb_by_rank"]
    assert len(by_rank) == 2 and by_rank[1] > 0 and abs(by_rank[0] - manifest["metrics"]["peak_mem_mb"]) < 5
    assert manifest["metrics"]["strategy"] == strategy
    assert manifest["metrics"]["tokens"] == json.loads((work / f"{name}-1" / "final" / "chatft_manifest.json")
                                                       .read_text())["metrics"]["tokens"]  # empty passes count none
    assert {p.name for p in (work / f"{name}-2" / "logs").iterdir()} >= {"rank_0.log", "rank_1.log"}
    # FSDP2: rank 0 alone reads the weights; the other process builds the model empty and receives its shards
    assert ("sent to each process as its shards" in result.stdout) == (strategy == "fsdp2")
    assert ("shards received from rank 0" in (work / f"{name}-2" / "logs" / "rank_1.log").read_text()) == (
        strategy == "fsdp2")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fsdp2_master_weights_below_float32_train_what_one_process_trains(work, tiny_model_dir, dtype):
    """float32 master weights gathered in the compute dtype (FSDP2's mixed precision), gradients reduced in float32;
    float16 with its loss scaler agreed across the shards. Equal to one process up to the compute dtype's rounding
    (measured: 5e-5 for float16, 1e-3 for bfloat16, whose norms run in bfloat16 when gathered so)."""
    settings = (f"model.torch_dtype={dtype}",)
    train(work, tiny_model_dir, "full", f"{dtype}-1", 1, *settings)
    train(work, tiny_model_dir, "full", f"{dtype}-2", 2, *settings)
    first, second = losses(work / f"{dtype}-1"), losses(work / f"{dtype}-2")
    assert len(first) == len(second) == 3 and max(abs(a - b) for a, b in zip(first, second)) < 5e-3, (first, second)
    metrics = json.loads((work / f"{dtype}-2" / "final" / "chatft_manifest.json").read_text())["metrics"]
    assert metrics["strategy"] == "fsdp2" and metrics["precision"]["weights"] == "float32"
    assert metrics.get("loss_scaling", False) == (dtype == "float16")


def test_fsdp2_with_stochastic_rounding_rounds_as_one_process_does(work, tiny_model_dir):
    """bfloat16 weights without a float32 copy, each process updating its rows: the random bits of each weight are
    a hash of its place in the whole tensor, so the shards round as one process rounds (exactly, for the same
    gradients: tests/test_sharding.py). What differs here is the gradients' bfloat16 reduction across processes,
    which moves some updates across a rounding threshold: measured 7% of the moved weights (independent random
    bits would round about a third of them differently)."""
    settings = ("model.torch_dtype=bfloat16", "optimizer.master_weights=stochastic_rounding")
    train(work, tiny_model_dir, "full", "rounding-1", 1, *settings)
    result = train(work, tiny_model_dir, "full", "rounding-2", 2, *settings)
    assert "FSDP2: weights" in result.stdout
    first, second = losses(work / "rounding-1"), losses(work / "rounding-2")
    assert len(first) == len(second) == 3 and max(abs(a - b) for a, b in zip(first, second)) < 5e-3, (first, second)
    one, two = weights(work / "rounding-1"), weights(work / "rounding-2")
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = sum(int((one[k] != start[k].to(one[k].dtype)).sum()) for k in one)
    differ = sum(int((one[k] != two[k]).sum()) for k in one)
    assert moved > 0 and differ < 0.15 * moved, (moved, differ)
    metrics = json.loads((work / "rounding-2" / "final" / "chatft_manifest.json").read_text())["metrics"]
    assert metrics["precision"]["weight_update"] == "stochastic rounding" and metrics["strategy"] == "fsdp2"


def test_fsdp2_recomputes_activations_as_one_process_does(work, tiny_model_dir):
    """Activation checkpointing wraps each decoder layer, which FSDP2 shards as a unit: both together train what one
    process without recomputation trains."""
    train(work, tiny_model_dir, "full", "recompute-reference", 1)
    result = train(work, tiny_model_dir, "full", "recompute-2", 2, "distributed.activation_checkpointing=selective")
    assert "activation checkpointing: selective" in result.stdout and "FSDP2: weights" in result.stdout
    assert_same_training(work / "recompute-reference", work / "recompute-2")


def test_validation_is_scored_over_both_shares(work, tiny_model_dir):
    """5 validation rows: 3 on the first process, 2 on the second, which makes up the count with an empty pass
    (FSDP2: every process gathers every layer's weights the same number of times)."""
    validation = ("validation_dataset.path_or_dataset_id=val.jsonl", "step_scheduler.val_every_steps=2")
    train(work, tiny_model_dir, "lora", "val-1", 1, *validation)
    train(work, tiny_model_dir, "lora", "val-2", 2, *validation, "distributed.strategy=fsdp2")
    rows = [[json.loads(line) for line in (work / run / "validation.jsonl").read_text().splitlines()]
            for run in ("val-1", "val-2")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [2, 3]
    for one, two in zip(*rows):
        assert one["tokens"] == two["tokens"] and abs(one["loss"] - two["loss"]) < TOLERANCE


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_at_another_world_size(work, tiny_model_dir, first, then):
    reference = f"resume-reference-{first}{then}"
    train(work, tiny_model_dir, "full", reference, 1)
    run = f"resume-{first}-then-{then}"
    train(work, tiny_model_dir, "full", run, first, "step_scheduler.max_steps=2", "step_scheduler.ckpt_every_steps=1")
    saved = work / run / "checkpoints" / "step_2"
    if first == 2:  # fsdp2: each process wrote its own shards (DCP) and generator states, no whole tensor file
        assert (saved / "sharded" / ".metadata").is_file() and not (saved / "trainable.safetensors").exists()
        assert {p.name for p in saved.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    else:
        assert (saved / "trainable.safetensors").is_file() and not (saved / "sharded").exists()
    result = train(work, tiny_model_dir, "full", run, then, f"checkpoint.resume={run}/checkpoints/step_2")
    assert "resuming from" in result.stdout
    assert f"resumed on {then} processes from a checkpoint written by {first}" in result.stdout
    assert_same_training(work / reference, work / run)


def test_a_refusal_reaches_the_console_once(work, tiny_model_dir):
    train(work, tiny_model_dir, "lora", "twice", 2)
    again = run_chatft(*command(tiny_model_dir, "lora", "twice", 2), cwd=work)
    stderr = assert_error_block(again, "config_invalid")
    assert "holds a finished run" in stderr


# Loaded by every Python process of the run through PYTHONPATH: in the process of rank 1 only, the model's
# forward runs out of memory at the third step, as a GPU that is fuller than the others would.
RANK_ONE_RUNS_OUT_OF_MEMORY = """
import os
if os.environ.get("RANK") == "1":
    import torch
    from chatft.train import loop
    original = loop.Trainer._optimizer_step

    def third_step_runs_out(self, *args):
        if self.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args)

    loop.Trainer._optimizer_step = third_step_runs_out
"""


def test_an_error_on_rank_one_only_reaches_the_console_once(work, tiny_model_dir, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(RANK_ONE_RUNS_OUT_OF_MEMORY)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([CHATFT, *command(tiny_model_dir, "lora", "rank-one-oom", 2)], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    stderr = assert_error_block(result, "oom")
    assert "out of memory at step 3" in stderr and "peft.dim" in stderr, stderr
    assert "rank_1.log" in os.listdir(work / "rank-one-oom" / "logs")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_train_what_one_process_trains(work, tiny_model_dir):
    train(work, tiny_model_dir, "lora", "nodes-1", 1)
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    nodes = [subprocess.Popen([CHATFT, *command(tiny_model_dir, "lora", "nodes-2", 1), "--nproc-per-node", "1",
                               "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", endpoint],
                              cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert sum(stdout.count("done: 3 steps") for stdout, _ in outputs) == 1  # the console of rank 0 alone
    assert_same_training(work / "nodes-1", work / "nodes-2")
    manifest = json.loads((work / "nodes-2" / "final" / "chatft_manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["nodes"] == 2
    logs = {p.name for p in (work / "nodes-2" / "logs").iterdir()}
    assert logs >= {"rank_0.log", "rank_1.log", "launcher_node_0.log", "launcher_node_1.log"}, logs
    argv = yaml.safe_load((work / "nodes-2" / "job.yaml").read_text())["argv"]
    assert argv[argv.index("--node-rank") + 1] == "0"  # job.yaml is written once, by node rank 0


def test_multi_node_flags_are_checked_before_anything_starts(work, tiny_model_dir):
    missing = run_chatft(*command(tiny_model_dir, "lora", "flags", 1), "--nnodes", "2", cwd=work)
    assert "needs --node-rank and --rdzv-endpoint" in assert_error_block(missing, "config_invalid")
    stray = run_chatft(*command(tiny_model_dir, "lora", "flags", 1), "--rdzv-endpoint", "h:1", cwd=work)
    assert "are for a run over several machines" in assert_error_block(stray, "config_invalid")
    assert not (work / "flags").exists()


def _wait_for_steps(run_dir: Path, steps: int, process: subprocess.Popen, deadline_s: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise AssertionError(f"fewer than {steps} steps after {deadline_s} s")


LONG_RUN = ("step_scheduler.num_epochs=200", "step_scheduler.ckpt_every_steps=5")


def _start(work: Path, model: Path, run: str, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHATFT_CACHE_DIR": str(work / "cache")}
    return subprocess.Popen([CHATFT, *command(model, "lora", run, 2, *LONG_RUN, *overrides)], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_to_the_launcher_saves_once_and_the_same_command_resumes(work, tiny_model_dir):
    """Sharded (FSDP2): every process writes its shards of the checkpoint (DCP), and reads them back on resume."""
    process = _start(work, tiny_model_dir, "stopped", "distributed.strategy=fsdp2")
    _wait_for_steps(work / "stopped", 7, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stdout + stderr
    assert stdout.count("stopped by SIGTERM") == 1 and "Traceback" not in stderr, stdout + stderr
    saved = int(re.search(r"after step (\d+)", stdout).group(1))
    assert (work / "stopped" / "checkpoints" / f"step_{saved}" / "sharded" / ".metadata").is_file()
    assert not list((work / "stopped" / "checkpoints").glob(".tmp-*"))
    again = run_chatft(*command(tiny_model_dir, "lora", "stopped", 2, *LONG_RUN, "distributed.strategy=fsdp2",
                                "step_scheduler.max_steps=" + str(saved + 2)), cwd=work)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"(step {saved})" in again.stdout


def test_a_killed_process_is_one_error_and_the_same_command_resumes(work, tiny_model_dir):
    process = _start(work, tiny_model_dir, "killed")
    _wait_for_steps(work / "killed", 7, process)  # past the checkpoint of step 5
    header = (work / "killed" / "logs" / "rank_1.log").read_text()
    os.kill(int(re.search(r"pid (\d+)", header).group(1)), signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    assert_error_block(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), "process_failed")
    assert "rank 1 was killed by SIGKILL" in stderr, stderr
    again = run_chatft(*command(tiny_model_dir, "lora", "killed", 2, *LONG_RUN, "step_scheduler.max_steps=12"),
                       cwd=work)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"resuming from \S+step_(5|10) ", again.stdout), again.stdout
