"""What training on several processes costs on this machine, through the real CLI.

The `cpu-smollm-lora` workload (SmolLM2-135M-Instruct, LoRA, float32, Alpaca converted by `chatft prep`, rows up to
512 tokens, 8 conversations per step) trained three ways, one after the other on the same machine:

- `one process`:          `chatft run peft/automodel ...`, every core to one process;
- `torchrun, world 1`:    `torchrun --nproc-per-node 1 -m chatft run ...`: chatft joined to a launcher it did not
                          start, at world size 1 (the distributed path's bookkeeping without a peer);
- `N processes x 1 core, ddp`: `chatft run ... --nproc-per-node N` (N = the machine's cores), gloo, the model on
                          every process, gradients added across processes once per step (LoRA's default);
- `N processes x 1 core, fsdp2`: the same with `distributed.strategy=fsdp2`: the model split across the
                          processes, each layer's weights gathered for every pass.

Each is reported as the median tokens/s of its steps after the warm-up ones, and as a ratio to `one process`.
Usage: `python bench/distributed.py [--steps 8] [--warmup 2] [--out bench/results]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.data import alpaca_messages  # noqa: E402
from chatft.paths import demo_model_dir  # noqa: E402
from chatft.run_layout import METRICS_FILE  # noqa: E402

GLOBAL_BATCH, LOCAL_BATCH, SEQ_LENGTH = 8, 2, 512


def training_args(model: Path, data: Path, run_dir: Path, steps: int) -> list[str]:
    return ["run", "peft/automodel", "-c", "tiny", f"model.pretrained_model_name_or_path={model}",
            f"dataset.path_or_dataset_id={data}", f"dataset.seq_length={SEQ_LENGTH}", "model.torch_dtype=float32",
            f"checkpoint.checkpoint_dir={run_dir}", f"step_scheduler.max_steps={steps}",
            f"step_scheduler.global_batch_size={GLOBAL_BATCH}", f"step_scheduler.local_batch_size={LOCAL_BATCH}",
            "step_scheduler.ckpt_every_steps=null", "step_scheduler.val_every_steps=null",
            "validation_dataset=null", "peft.dropout=0", "seed=7"]


def ways(cores: int) -> dict[str, tuple[list[str], list[str], int]]:
    """Each way's command before and after the training arguments, and the threads each of its processes may
    use."""
    chatft = [sys.executable, "-m", "chatft"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "chatft"]
    several = ["--nproc-per-node", str(cores)]
    return {"one process": (chatft, [], cores), "torchrun, world 1": (torchrun, [], cores),
            f"{cores} processes x 1 core, ddp": (chatft, ["distributed.strategy=ddp", *several], 1),
            f"{cores} processes x 1 core, fsdp2": (chatft, ["distributed.strategy=fsdp2", *several], 1)}


def measure(name: str, command: list[str], threads: int, run_dir: Path, warmup: int) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"{name} failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    timed = rows[warmup:]
    manifest = json.loads((run_dir / "final" / "chatft_manifest.json").read_text())["metrics"]
    by_rank = manifest.get("peak_mem_mb_by_rank") or [max(row["peak_mem_mb"] for row in rows)]
    return {"command": " ".join(command[1:]), "omp_num_threads": threads, "steps": len(rows),
            "timed_steps": len(timed), "tokens_per_s": statistics.median(row["tokens_per_s"] for row in timed),
            "peak_mem_mb": max(by_rank), "peak_mem_mb_by_rank": by_rank, "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    options = parser.parse_args()
    cores = os.cpu_count() or 1
    model = demo_model_dir()
    if not (model / "config.json").exists():
        raise SystemExit(f"the demo model is not at {model}: run `make demo-model` first")
    with tempfile.TemporaryDirectory(prefix="chatft-bench-distributed-") as tmp:
        work = Path(tmp)
        data, _ = alpaca_messages(work)
        results = {}
        for index, (name, (launcher, flags, threads)) in enumerate(ways(cores).items()):
            run_dir = work / f"run{index}"
            command = [*launcher, *training_args(model, data, run_dir, options.steps), *flags]
            results[name] = measure(name, command, threads, run_dir, options.warmup)
            print(f"{name}: {results[name]['tokens_per_s']:.0f} tokens/s, {results[name]['wall_s']} s", flush=True)
    reference = results["one process"]["tokens_per_s"]
    for result in results.values():
        result["ratio_to_one_process"] = round(result["tokens_per_s"] / reference, 3)
    report = {"workload": "cpu-smollm-lora through the CLI", "cores": cores, "global_batch": GLOBAL_BATCH,
              "local_batch": LOCAL_BATCH, "seq_length": SEQ_LENGTH, "systems": results}
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "cpu-distributed.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Several processes on CPU ({cores} cores), {report['workload']}", "",
             "| way | threads/process | tokens/s | x one process | peak MB per process (rank 0, 1, ...) | wall s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['omp_num_threads']} | {r['tokens_per_s']:.0f} | {r['ratio_to_one_process']:.2f} | "
              f"{' / '.join(f'{peak:,.0f}' for peak in r['peak_mem_mb_by_rank'])} | {r['wall_s']} |"
              for name, r in results.items()]
    (options.out / "cpu-distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
