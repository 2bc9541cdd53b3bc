"""bfloat16 full SFT: how each way of updating the weights trains, against float32, on the real demo model.

    python bench/precision.py [--steps 20] [--lr 1e-5] [--modes float32,master,stochastic_rounding,none]
                              [--model DIR] [--out DIR]

Each mode is one `chatft run sft/automodel` through the real CLI, in its own process, on SmolLM2-135M-Instruct
(`scripts/get_demo_model.py`) and the Alpaca rows of ../shared/data (converted by `chatft prep`), same seed, same
rows in the same order, a constant learning rate, 4 conversations per step in one micro-batch:

- float32:             model.torch_dtype=float32 (the reference)
- master:              bfloat16, optimizer.master_weights=float32 (float32 master weights, bfloat16 autocast)
- stochastic_rounding: bfloat16, optimizer.master_weights=stochastic_rounding
- none:                bfloat16, optimizer.master_weights=none (bfloat16 weights and moments, rounded to nearest)

Reported per mode: the loss at each step and its largest distance from float32's, the share of weights whose
bfloat16 value changed (the final artifact against the base, both rounded to bfloat16), seconds per step after the
first two, peak RSS (metrics.jsonl `peak_mem_mb`) and chatft's own memory estimate. Writes OUT/precision.json and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chatft.artifacts import MANIFEST_FILE  # noqa: E402 (after the path set-up above)
from chatft.run_layout import FINAL, METRICS_FILE  # noqa: E402

MODES = {
    "float32": ["model.torch_dtype=float32"],
    "master": ["model.torch_dtype=bfloat16", "optimizer.master_weights=float32"],
    "stochastic_rounding": ["model.torch_dtype=bfloat16", "optimizer.master_weights=stochastic_rounding"],
    "none": ["model.torch_dtype=bfloat16", "optimizer.master_weights=none"],
}


def chatft(*args: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run([sys.executable, "-m", "chatft.cli", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"chatft {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def bfloat16_changed(final: Path, base: Path) -> float:
    """Share of weights whose bfloat16 value differs between the trained artifact and the base."""
    import torch
    from safetensors.torch import load_file

    before: dict[str, Any] = {}
    for path in sorted(base.glob("*.safetensors")):
        before.update(load_file(str(path)))
    changed = total = 0
    for path in sorted(final.glob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            if name not in before:
                continue
            changed += int((tensor.to(torch.bfloat16) != before[name].to(torch.bfloat16)).sum())
            total += tensor.numel()
    return changed / total


def run_mode(mode: str, args: argparse.Namespace, data: Path, model: Path, out: Path) -> dict[str, Any]:
    run_dir = out / mode
    shutil.rmtree(run_dir, ignore_errors=True)
    chatft("run", "sft/automodel", "-c", "tiny", *MODES[mode],
           f"model.pretrained_model_name_or_path={model}", f"dataset.path_or_dataset_id={data}",
           f"checkpoint.checkpoint_dir={run_dir}", f"step_scheduler.max_steps={args.steps}",
           "step_scheduler.global_batch_size=4", "step_scheduler.local_batch_size=4",
           "step_scheduler.ckpt_every_steps=null", "step_scheduler.val_every_steps=null", "validation_dataset=null",
           "dataloader.shuffle=false", f"optimizer.lr={args.lr}", "optimizer.weight_decay=0.0",
           "lr_scheduler.lr_warmup_steps=0", "lr_scheduler.lr_decay_style=constant")
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    manifest = json.loads((run_dir / FINAL / MANIFEST_FILE).read_text())
    ends = [row["elapsed_s"] for row in rows]
    step_seconds = [b - a for a, b in zip(ends[1:], ends[2:])]  # after the first two steps
    return {
        "losses": [row["loss"] for row in rows],
        "seconds_per_step": statistics.median(step_seconds) if step_seconds else None,
        "peak_mem_mb": max(row["peak_mem_mb"] for row in rows),
        "memory_estimate_mb": manifest["metrics"].get("memory_estimate_mb"),
        "precision": manifest["metrics"].get("precision"),
        "bfloat16_changed": bfloat16_changed(run_dir / FINAL, model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--model", help="a full-precision HF model dir (default: the demo model)")
    parser.add_argument("--out", default="/tmp/chatft-bench-precision")
    args = parser.parse_args()
    from bench import data as bench_data
    from bench.workloads import demo_model_dir

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model).resolve() if args.model else demo_model_dir()
    alpaca, _ = bench_data.alpaca_messages(out)
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run_mode(mode, args, alpaca, model, out)
        print(f"{mode}: done", flush=True)
    reference = results.get("float32")
    lines = ["| mode | loss at step 1 / last | largest distance from float32's loss | bfloat16 weights changed | "
             "s/step | peak RSS MB | estimate MB |", "|---|---|---|---|---|---|---|"]
    for mode, result in results.items():
        losses = result["losses"]
        distance = (max(abs(a - b) for a, b in zip(losses, reference["losses"])) if reference else None)
        result["largest_distance_from_float32"] = distance
        lines.append(f"| {mode} | {losses[0]:.4f} / {losses[-1]:.4f} | "
                     f"{'' if distance is None else f'{distance:.4f}'} | {result['bfloat16_changed']:.1%} | "
                     f"{result['seconds_per_step']:.2f} | {result['peak_mem_mb']:,.0f} | "
                     f"{result['memory_estimate_mb'] or 0:,.0f} |")
    command = "python bench/precision.py " + " ".join(sys.argv[1:])
    (out / "precision.json").write_text(json.dumps({"command": command, "steps": args.steps, "lr": args.lr,
                                                    "model": str(model), "results": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
