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
import tempfile
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
    # TRL loads with transformers' defaults, which on a GPU swap layers for kernels fetched from the Hub (and stop
    # offline); chatft loads without them. Both systems run the same model code.
    env.setdefault("USE_HUB_KERNELS", "NO")
    if settings.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # chatft takes a GPU whenever it sees one; a CPU workload must not
    return env


class WorkerFailed(Exception):
    """A worker subprocess exited with an error; the message holds the end of its log."""


def run_subprocess(args: list[str], log: Path, env: dict[str, str], what: str) -> None:
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], stdout=fh,
                              stderr=subprocess.STDOUT, cwd=ROOT, env=env, check=False)
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise WorkerFailed(f"{what} failed (rc {proc.returncode}); log {log}:\n{tail}")


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


def random_model_shape(workload: workloads.Workload, settings: RunSettings,
                       model_arg: str | None) -> tuple[workloads.ModelShape, Path]:
    """A gpu-* workload's model shape (toy-sized for --quick) and the dir whose tokenizer it gets."""
    from transformers import AutoTokenizer

    tokenizer_dir = Path(model_arg).resolve() if model_arg else workloads.demo_model_dir()
    shape = workload.model
    if settings.quick:
        vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
        shape = shape.toy(vocab=-(-vocab // 64) * 64)
    return shape, tokenizer_dir


def prepare_model(workload: workloads.Workload, settings: RunSettings, model_arg: str | None, work: Path,
                  build_device: str = "cpu") -> Path:
    if workload.model is None:
        return Path(model_arg).resolve() if model_arg else workloads.demo_model_dir()
    shape, tokenizer_dir = random_model_shape(workload, settings, model_arg)
    where = work / "model" if settings.quick else workloads.cache_root()
    print(f"model: random {shape} with the tokenizer of {tokenizer_dir}", flush=True)
    model = workloads.random_model_dir(shape, tokenizer_dir, settings.dtype, where=where, build_device=build_device)
    settings.model_shape = {**shape.__dict__, "tokenizer_from": str(tokenizer_dir)}
    return model


def build_model(args: argparse.Namespace) -> None:
    """--build-model: make (or find) the workload's random model in the cache and exit, initialising it on the
    GPU where there is one. A GPU session runs this beside other work so that the benchmark finds it built."""
    workload = WORKLOADS[args.workload]
    if workload.model is None:
        raise SystemExit("--build-model is for the gpu-* workloads (the cpu-* ones train a real model)")
    if args.quick and not args.out:
        raise SystemExit("--build-model --quick builds the toy model in OUT/<workload>.work/model: give --out")
    settings = resolve_settings(args, workload)
    began = time.monotonic()
    work = Path(args.out or ".").resolve() / f"{workload.name}.work"  # used by --quick only
    model = prepare_model(workload, settings, args.model, work, build_device=settings.device)
    print(f"built on {settings.device} in {time.monotonic() - began:.0f}s: {model}", flush=True)


def prepare_data(args: argparse.Namespace) -> None:
    """--prepare-data: make (or find) a gpu-* workload's synthetic rows in the data cache and exit, on any machine
    (the rows depend on the tokenizer and the run's shape, not on the device): bench/device/kit.sh makes them
    here so the GPU session finds them made."""
    workload = WORKLOADS[args.workload]
    if workload.model is None:
        raise SystemExit("--prepare-data is for the gpu-* workloads (the cpu-* ones read Alpaca in seconds)")
    settings = resolve_settings(args, workload, assume_cuda=True)
    tokenizer = workloads.model_dir_tokenizer(*random_model_shape(workload, settings, args.model))
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        prepared = data.prepare(settings, tokenizer, Path(work), workload.data,
                                want_pool="trl-packed" in (args.peers or "").split(","))
    print(f"{workload.name}: {len(prepared.lengths)} rows (trl-packed pool: {prepared.pool_rows}) in "
          f"{data.data_cache_dir()}, {time.monotonic() - began:.0f}s", flush=True)


def resolve_settings(args: argparse.Namespace, workload: workloads.Workload,
                     assume_cuda: bool = False) -> RunSettings:
    has_cuda = workload.device == "cuda" and (assume_cuda or workloads.cuda_available())
    checkpointing = None if args.activation_checkpointing is None else args.activation_checkpointing == "on"
    settings = workloads.resolve(workload, quick=args.quick, steps=args.steps, warmup=args.warmup,
                                 repeats=args.repeats, has_cuda=has_cuda, activation_checkpointing=checkpointing)
    if settings.warmup >= settings.steps:
        raise SystemExit("--warmup must be smaller than --steps")
    return settings


def run_benchmark(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    workload = WORKLOADS[args.workload]
    chosen = ["chatft"] + [p for p in (args.peers or "").split(",") if p]
    unknown = [s for s in chosen if s not in systems.SYSTEMS]
    if unknown or len(set(chosen)) != len(chosen):
        raise SystemExit(f"--peers: unknown or repeated {unknown or chosen}; choose from "
                         f"{', '.join(s for s in systems.SYSTEMS if s != 'chatft')}")
    settings = resolve_settings(args, workload)
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
    failures: dict[str, str] = {}  # system -> why its worker failed; it is not run again
    command = "python bench/run.py " + shlex.join(sys.argv[1:])

    def write_report(peaks: dict[str, Any], partial: bool) -> dict[str, Any] | None:
        result = report.build(workload, settings, {s: raws[s] for s in chosen}, failures, counts, peaks, rows.info,
                              device=device_name, versions=versions(), command=command, partial=partial)
        if result is not None:
            report.write(result, out)
        return result

    for r in range(settings.repeats):
        order = chosen if r % 2 == 0 else list(reversed(chosen))
        for system in (s for s in order if s not in failures):
            began = time.monotonic()
            result_file = work / f"{system}_r{r}.json"
            run_dir = work / f"run_{system}_r{r}"
            try:
                run_subprocess(["--worker", system, "--job", str(work / "job.json"), "--result", str(result_file),
                                "--run-dir", str(run_dir)], work / f"{system}_r{r}.log", worker_env(settings),
                               f"{system} repeat {r}")
            except WorkerFailed as failure:  # the other systems still run; the exit status reports it
                failures[system] = str(failure)
                print(failure, flush=True)
                continue
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)  # chatft's final/ is a full model copy
            raws[system].append(json.loads(result_file.read_text()))
            print(f"repeat {r} {system}: {time.monotonic() - began:.0f}s wall", flush=True)
            write_report(flops.merge_peaks([peaks_before]), partial=True)
    peaks_after, _ = measure_peaks(settings, dtypes, work, "after")
    result = write_report(flops.merge_peaks([peaks_before, peaks_after]), partial=False)
    if result is not None:
        print(f"\n{workload.name}: {out / workload.name}.json and .md\n")
        print(report.header_line(result))
        print("\n".join(report.table_lines(result)))
    if result is None or failures:
        raise SystemExit(f"{workload.name}: {len(failures)} system(s) failed: {', '.join(failures)}")


def run_worker(args: argparse.Namespace) -> None:
    settings = RunSettings.from_json(json.loads(Path(args.job).read_text()))
    if args.worker == "peak":
        import torch

        peaks = flops.device_peaks(settings.device, set(args.dtypes.split(",")), settings.threads)
        out = {"peaks": peaks, "device": f"cuda ({torch.cuda.get_device_name()}, torch CUDA {torch.version.cuda})"}
    elif args.worker in os.environ.get("CHATFT_BENCH_FAIL", "").split(","):  # the harness's own tests
        raise SystemExit(f"{args.worker}: failing on purpose (CHATFT_BENCH_FAIL)")
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
    parser.add_argument("--activation-checkpointing", choices=["on", "off"],
                        help="override the workload's setting, for every system alike (gpu-8b-lora: on)")
    parser.add_argument("--build-model", action="store_true",
                        help="gpu-* workloads: only build (or find) the cached random model, on the GPU if any")
    parser.add_argument("--prepare-data", action="store_true",
                        help="gpu-* workloads: only make (or find) the cached synthetic rows for these --steps and "
                        "--peers (trl-packed adds its pool), on any machine")
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
    if args.build_model and args.workload:
        build_model(args)
        return
    if args.prepare_data and args.workload:
        prepare_data(args)
        return
    if not args.workload or not args.out:
        parser.error("--workload and --out are required")
    try:
        run_benchmark(args)
    except WorkerFailed as failure:  # the device peak's worker: nothing can be measured without it
        raise SystemExit(str(failure)) from None


if __name__ == "__main__":
    main()
