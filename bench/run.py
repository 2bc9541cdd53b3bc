"""Throughput benchmark: chatft against TRL's SFTTrainer on the same model, rows, order and settings.

    python bench/run.py --workload cpu-smollm-lora --peers trl,trl-packed,trl-padding-free --out bench/results
    python bench/run.py --workload gpu-small-full --quick --out /tmp/bench     # toy size, any machine

The parent prepares the model and the rows once, measures the device peak, then runs every system in a fresh
subprocess per repeat (so each run's peak memory is its own), reversing the order of the systems from one
repeat to the next. Each worker writes per-step times, losses and counts; the parent times the steps after
the warm-up, takes medians over the repeats and writes OUT/<workload>.json and OUT/<workload>.md.
Workloads, systems, formulas and what could not be matched: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, Python puts bench/ itself first on the path, where its modules (data, report, ...) would
# shadow any library module of the same name; import them as the package `bench` from the checkout instead.
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import data, flops, report, systems, workloads
from bench.workloads import WORKLOADS, RunSettings

PACKAGES = ("chatft", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "flash_attn")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            pass
    return out


def worker_env(settings: RunSettings) -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if settings.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # chatft takes a GPU whenever it sees one; a CPU workload must not
    return env


def run_subprocess(args: list[str], log: Path, env: dict[str, str], what: str) -> None:
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], stdout=fh,
                              stderr=subprocess.STDOUT, cwd=ROOT, env=env, check=False)
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise SystemExit(f"{what} failed (rc {proc.returncode}); log {log}:\n{tail}")


def measure_peaks(settings: RunSettings, dtypes: set[str], work: Path, tag: str) -> tuple[dict[str, Any], str]:
    """Device peak per compute dtype, and the device's name. On CUDA in a subprocess, so the parent never
    holds a CUDA context (and its memory) while the workers run."""
    if settings.device == "cpu":
        cores = os.cpu_count()
        name = f"cpu ({platform.processor() or platform.machine()}, {cores} cores, torch threads {settings.threads})"
        return flops.device_peaks("cpu", dtypes, settings.threads), name
    result = work / f"peak_{tag}.json"
    run_subprocess(["--worker", "peak", "--job", str(work / "job.json"), "--result", str(result),
                    "--dtypes", ",".join(sorted(dtypes))], work / f"peak_{tag}.log", worker_env(settings), "peak")
    measured = json.loads(result.read_text())
    return measured["peaks"], measured["device"]


def prepare_model(workload: workloads.Workload, settings: RunSettings, model_arg: str | None, work: Path) -> Path:
    if workload.model is None:
        return Path(model_arg).resolve() if model_arg else workloads.demo_model_dir()
    from transformers import AutoTokenizer

    tokenizer_dir = Path(model_arg).resolve() if model_arg else workloads.demo_model_dir()
    shape = workload.model
    if settings.quick:
        vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
        shape = shape.toy(vocab=-(-vocab // 64) * 64)
    where = work / "model" if settings.quick else workloads.cache_root()
    print(f"model: random {shape} with the tokenizer of {tokenizer_dir}", flush=True)
    model = workloads.random_model_dir(shape, tokenizer_dir, settings.dtype, where=where)
    settings.model_shape = {**shape.__dict__, "tokenizer_from": str(tokenizer_dir)}
    return model


def run_benchmark(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    workload = WORKLOADS[args.workload]
    chosen = ["chatft"] + [p for p in (args.peers or "").split(",") if p]
    unknown = [s for s in chosen if s not in systems.SYSTEMS]
    if unknown or len(set(chosen)) != len(chosen):
        raise SystemExit(f"--peers: unknown or repeated {unknown or chosen}; choose from "
                         f"{', '.join(s for s in systems.SYSTEMS if s != 'chatft')}")
    has_cuda = workload.device == "cuda" and workloads.cuda_available()
    settings = workloads.resolve(workload, quick=args.quick, steps=args.steps, warmup=args.warmup,
                                 repeats=args.repeats, has_cuda=has_cuda)
    if settings.warmup >= settings.steps:
        raise SystemExit("--warmup must be smaller than --steps")
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    out = Path(args.out).resolve()
    work = out / f"{workload.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    model = prepare_model(workload, settings, args.model, work)
    settings.model_dir = str(model)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    rows = data.prepare(settings, tokenizer, work, workload.data, want_pool="trl-packed" in chosen)
    settings.rows = str(rows.rows)
    settings.packed_pool = str(rows.pool) if rows.pool else None
    settings.packs_needed = rows.packs_needed
    (work / "job.json").write_text(json.dumps(settings.to_json(), indent=1))

    counts = flops.count_model(model, settings.lora, settings.lora_r, settings.lora_targets)
    dtypes = {systems.compute_dtype(s, settings) for s in chosen}
    peaks_before, device_name = measure_peaks(settings, dtypes, work, "before")

    raws: dict[str, list[dict[str, Any]]] = {s: [] for s in chosen}
    for r in range(settings.repeats):
        order = chosen if r % 2 == 0 else list(reversed(chosen))
        for system in order:
            began = time.monotonic()
            result = work / f"{system}_r{r}.json"
            run_dir = work / f"run_{system}_r{r}"
            run_subprocess(["--worker", system, "--job", str(work / "job.json"), "--result", str(result),
                            "--run-dir", str(run_dir)], work / f"{system}_r{r}.log", worker_env(settings),
                           f"{system} repeat {r}")
            raws[system].append(json.loads(result.read_text()))
            shutil.rmtree(run_dir, ignore_errors=True)  # chatft's final/ is a full model copy
            print(f"repeat {r} {system}: {time.monotonic() - began:.0f}s wall", flush=True)
    peaks_after, _ = measure_peaks(settings, dtypes, work, "after")
    peaks = flops.merge_peaks([peaks_before, peaks_after])

    summary = {s: report.summarise_system(raws[s], settings.warmup, counts, settings.lora,
                                          peaks[systems.compute_dtype(s, settings)]) for s in chosen}
    ratio, ratio_table = report.ratios(summary)
    result = {
        "workload": workload.name,
        "device": device_name,
        "versions": versions(),
        "command": "python bench/run.py " + shlex.join(sys.argv[1:]),
        "settings": {**settings.to_json(), "global_batch": settings.global_batch, "description": workload.summary,
                     "lr_schedule": "constant, no warm-up", "data": rows.info},
        "model_counts": counts.__dict__,
        "flop_formula": counts.formula(settings.lora),
        "peak_flops": peaks,
        "systems": summary,
        "ratio": ratio,
        "ratios": ratio_table,
        "notes": report.notes(workload, settings, summary, raws, rows.info, counts, peaks),
    }
    json_path, md_path = report.write(result, out)
    print(f"\n{workload.name}: {json_path} and {md_path}\n")
    print(report.header_line(result))
    print("\n".join(report.table_lines(result)))


def run_worker(args: argparse.Namespace) -> None:
    settings = RunSettings.from_json(json.loads(Path(args.job).read_text()))
    if args.worker == "peak":
        import torch

        peaks = flops.device_peaks(settings.device, set(args.dtypes.split(",")), settings.threads)
        out = {"peaks": peaks, "device": f"cuda ({torch.cuda.get_device_name()}, torch CUDA {torch.version.cuda})"}
    else:
        out = systems.run_system(args.worker, settings, Path(args.run_dir))
    Path(args.result).write_text(json.dumps(out, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS))
    parser.add_argument("--peers", default="trl", help="comma-separated systems besides chatft: "
                        f"{', '.join(s for s in systems.SYSTEMS if s != 'chatft')}; '' for chatft alone")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {workloads.DEFAULT_STEPS}; "
                        f"--quick {workloads.QUICK_STEPS})")
    parser.add_argument("--warmup", type=int, help=f"untimed first steps (default {workloads.DEFAULT_WARMUP}; "
                        f"--quick {workloads.QUICK_WARMUP})")
    parser.add_argument("--repeats", type=int, help=f"runs per system (default {workloads.DEFAULT_REPEATS}; "
                        f"--quick {workloads.QUICK_REPEATS})")
    parser.add_argument("--quick", action="store_true", help="toy size, runs anywhere in a minute or two")
    parser.add_argument("--model", help="cpu-* workloads: the model dir to train (default: SmolLM2-135M-Instruct); "
                        "gpu-* workloads: the dir whose tokenizer the random model gets")
    parser.add_argument("--out", help="where <workload>.json, <workload>.md and <workload>.work/ go")
    # worker-only
    parser.add_argument("--worker", choices=[*systems.SYSTEMS, "peak"], help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--dtypes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    if not args.workload or not args.out:
        parser.error("--workload and --out are required")
    run_benchmark(args)


if __name__ == "__main__":
    main()
