"""Throughput benchmark: chatft against TRL's SFTTrainer on the same model, rows, order and settings.

    python bench/run.py --workload smollm2-lora-cpu --peers trl --steps 6 --warmup 2 --repeats 2 --out bench/results

The parent process prepares the rows once, measures the device peak (a large float32 matmul), then runs
every system in a fresh subprocess per repeat (so the peak RSS of each run is its own), alternating the
order of the systems from one repeat to the next. Each worker writes a JSON of per-step times, tokens and
losses; the parent keeps the steps after the warm-up, takes medians over repeats and writes
OUT/<workload>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA_FILE = Path("/work/shared/data/dummy_conversation.json")
SEED = 7

WORKLOADS: dict[str, dict[str, Any]] = {
    "smollm2-lora-cpu": {"lora": True, "seq_length": 256, "local_batch": 2, "accumulation": 4, "lr": 2e-4,
                         "lora_r": 16, "lora_alpha": 32},
    "smollm2-full-cpu": {"lora": False, "seq_length": 256, "local_batch": 2, "accumulation": 4, "lr": 2e-5},
}
LORA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # all linear but lm_head
OPTIMIZER = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "max_grad_norm": 1.0}


# --------------------------------------------------------------------------- shared helpers


def model_dir() -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    from get_demo_model import ensure_demo_model

    return Path(ensure_demo_model())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_token_counts(rows: list[tuple[list[int], list[bool]]], global_batch: int, steps: int) -> list[dict[str, int]]:
    """Per optimizer step: non-padding tokens and supervised tokens (labels after the one-token shift),
    for rows taken in order, `global_batch` per step."""
    out = []
    for k in range(steps):
        chunk = rows[k * global_batch:(k + 1) * global_batch]
        out.append({"tokens": sum(len(ids) for ids, _ in chunk),
                    "supervised": sum(sum(bool(m) for m in mask[1:]) for _, mask in chunk)})
    return out


# --------------------------------------------------------------------------- workers (one per subprocess)


def worker_chatft(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from chatft.config.schema import TrainingConfig
    from chatft.data.pipeline import prepare_training_data
    from chatft.train.loop import train
    from chatft.train.model import load_tokenizer

    run_dir = Path(args.run_dir)
    global_batch = spec["local_batch"] * spec["accumulation"]
    tree: dict[str, Any] = {
        "seed": SEED,
        "model": {"pretrained_model_name_or_path": str(args.model), "torch_dtype": "float32",
                  "attn_implementation": "sdpa"},
        "dataset": {"path_or_dataset_id": str(args.data), "seq_length": spec["seq_length"], "truncation": "drop",
                    "train_on": "last_assistant"},
        "dataloader": {"shuffle": False, "group_by_length": False, "num_workers": 0},
        "step_scheduler": {"global_batch_size": global_batch, "local_batch_size": spec["local_batch"],
                           "max_steps": args.steps, "num_epochs": 1, "ckpt_every_steps": None,
                           "val_every_steps": None},
        "optimizer": {"lr": spec["lr"], "weight_decay": OPTIMIZER["weight_decay"], "betas": list(OPTIMIZER["betas"]),
                      "eps": OPTIMIZER["eps"]},
        "lr_scheduler": {"lr_warmup_steps": 0, "lr_decay_style": "constant"},
        "clip_grad_norm": {"max_norm": OPTIMIZER["max_grad_norm"]},
        "checkpoint": {"checkpoint_dir": str(run_dir), "enabled": False, "overwrite": True},
        "distributed": {"activation_checkpointing": False},
        "peft": ({"dim": spec["lora_r"], "alpha": spec["lora_alpha"], "dropout": 0.0, "target_modules": LORA_TARGETS}
                 if spec["lora"] else None),
        "force": True,
    }
    cfg = TrainingConfig.model_validate(tree)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_training_data(cfg.dataset, tokenizer, use_cache=False, log=lambda line: None)
    counts = step_token_counts([(r.input_ids, r.loss_mask) for r in data.rows], global_batch, args.steps)
    result = train(cfg, run_dir, data, tokenizer=tokenizer)
    metrics = read_rows(run_dir / "metrics.jsonl")
    return {
        "steps": [{"step": m["step"], "end_s": m["elapsed_s"], "loss": m["loss"], "tokens": m["tokens"],
                   "supervised": counts[i]["supervised"]} for i, m in enumerate(metrics)],
        "final_loss": result.train_loss,
        "rows_used": data.report.rows_used,
        "threads": torch.get_num_threads(),
    }


def worker_trl(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(SEED)
    global_batch = spec["local_batch"] * spec["accumulation"]
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # the same filler id chatft uses
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    # Prompt/completion conversational rows: the completion is the last assistant message, which is what
    # chatft's `train_on: last_assistant` supervises.
    rows = read_rows(Path(args.data))
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                                 target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
    config = SFTConfig(
        output_dir=str(args.run_dir), max_steps=args.steps, num_train_epochs=1,
        per_device_train_batch_size=spec["local_batch"], gradient_accumulation_steps=spec["accumulation"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=OPTIMIZER["betas"][0], adam_beta2=OPTIMIZER["betas"][1], adam_epsilon=OPTIMIZER["eps"],
        weight_decay=OPTIMIZER["weight_decay"], max_grad_norm=OPTIMIZER["max_grad_norm"],
        bf16=False, fp16=False, gradient_checkpointing=False, activation_checkpointing=False, packing=False, padding_free=False,
        max_length=spec["seq_length"], completion_only_loss=True, assistant_only_loss=False,
        train_sampling_strategy="sequential", seed=SEED, data_seed=SEED, use_cpu=True,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.monotonic()
            self.ends: dict[int, float] = {}
            self.losses: dict[int, float] = {}

        def on_step_end(self, _args, state, control, **kwargs):
            self.ends[state.global_step] = time.monotonic() - self.t0

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    timer = Timer()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[timer])
    prepared = trainer.train_dataset
    columns = prepared.column_names
    token_rows = []
    for ex in prepared:
        ids = ex["input_ids"]
        if "labels" in columns:
            mask = [label != -100 for label in ex["labels"]]
        else:
            mask = [bool(m) for m in ex["completion_mask"]]
        token_rows.append((ids, mask))
    counts = step_token_counts(token_rows, global_batch, args.steps)
    checks = {"args.activation_checkpointing": trainer.args.activation_checkpointing,
              "args.bf16": trainer.args.bf16, "model_dtype": str(next(trainer.model.parameters()).dtype),
              "optimizer": str(trainer.args.optim), "lr_scheduler": str(trainer.args.lr_scheduler_type)}
    trainer.train()
    checks["model_checkpointing_after_train"] = bool(getattr(trainer.model, "is_gradient_checkpointing", False))
    steps = [{"step": s, "end_s": timer.ends[s], "loss": timer.losses.get(s), "tokens": counts[s - 1]["tokens"],
              "supervised": counts[s - 1]["supervised"]} for s in sorted(timer.ends)]
    return {"steps": steps, "final_loss": steps[-1]["loss"] if steps else None, "rows_used": len(prepared),
            "columns": columns, "threads": torch.get_num_threads(), "checks": checks}


def run_worker(args: argparse.Namespace) -> None:
    spec = WORKLOADS[args.workload]
    fn = {"chatft": worker_chatft, "trl": worker_trl}[args.worker]
    result = fn(args, spec)
    result["peak_rss_mb"] = peak_rss_mb()
    Path(args.result).write_text(json.dumps(result, indent=1))


# --------------------------------------------------------------------------- parent


def prepare_rows(model: Path, spec: dict[str, Any], needed: int, out: Path) -> tuple[Path, dict[str, Any]]:
    """ShareGPT -> messages with chatft's converter; keep the first `needed` rows that fit the sequence
    limit and end on an assistant turn, so neither system drops or truncates anything."""
    from transformers import AutoTokenizer

    from chatft.config.schema import DatasetSection
    from chatft.data.formats import RowDropped, convert_row
    from chatft.data.pipeline import prepare_training_data

    raw = json.loads(DATA_FILE.read_text())
    converted, dropped = [], 0
    for row in raw:
        try:
            conv = convert_row(row, "sharegpt")
        except RowDropped:
            dropped += 1
            continue
        if conv.messages and conv.messages[-1]["role"] == "assistant":
            converted.append({"messages": conv.messages})
        else:
            dropped += 1
    out.mkdir(parents=True, exist_ok=True)
    every = out / "all_rows.jsonl"
    every.write_text("".join(json.dumps(r) + "\n" for r in converted))
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    section = DatasetSection(path_or_dataset_id=str(every), seq_length=spec["seq_length"], truncation="drop",
                             train_on="last_assistant")
    data = prepare_training_data(section, tokenizer, use_cache=False, log=lambda line: None)
    # source_row numbering: match by content, robust to 0/1-based numbering
    keep_rows, seen = [], set()
    index_base = 1 if data.rows and min(r.source_row for r in data.rows) >= 1 else 0
    for r in data.rows:
        idx = r.source_row - index_base
        if idx not in seen:
            seen.add(idx)
            keep_rows.append(converted[idx])
        if len(keep_rows) == needed:
            break
    if len(keep_rows) < needed:
        raise SystemExit(f"only {len(keep_rows)} usable rows, {needed} needed")
    path = out / "bench_rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in keep_rows))
    info = {"source": str(DATA_FILE), "rows_in": len(raw), "dropped_by_convert": dropped,
            "usable_after_chatft_guards": data.report.rows_used, "rows_used": needed,
            "dropped_by_reason": data.report.dropped_by_reason}
    return path, info


def measure_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    import torch

    a = torch.randn(size, size, dtype=torch.float32)
    b = torch.randn(size, size, dtype=torch.float32)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size ** 3 / (time.perf_counter() - t))
    return best


def count_params(model: Path, spec: dict[str, Any]) -> dict[str, int]:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    counts = {"params": sum(p.numel() for p in m.parameters())}  # tied embeddings counted once
    if spec["lora"]:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                         target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
        pm = get_peft_model(m, cfg)
        counts["lora_params"] = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    return counts


def probe_assistant_only_loss(model: Path, data: Path, out: Path) -> str:
    """Try TRL's `assistant_only_loss=True` on the messages rows; return what happened."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    ds = Dataset.from_list(read_rows(data)[:4])
    cfg = SFTConfig(output_dir=str(out / "probe"), assistant_only_loss=True, max_steps=1, bf16=False, use_cpu=True,
                    report_to="none", max_length=256)
    try:
        SFTTrainer(model=m, args=cfg, train_dataset=ds, processing_class=tokenizer)
    except Exception as exc:  # noqa: BLE001 - the refusal is the finding
        return f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:400]}"
    return "accepted (TRL built assistant masks for this template)"


def summarise(raw: dict[str, Any], warmup: int, flops_per_token: float, peak: float) -> dict[str, Any]:
    steps = raw["steps"]
    timed = [s for s in steps if s["step"] > warmup]
    start = next(s["end_s"] for s in steps if s["step"] == warmup) if warmup > 0 else 0.0
    seconds = timed[-1]["end_s"] - start
    tokens = sum(s["tokens"] for s in timed)
    supervised = sum(s["supervised"] for s in timed)
    tps = tokens / seconds
    return {"seconds": seconds, "timed_steps": len(timed), "tokens": tokens, "supervised_tokens": supervised,
            "tokens_per_s": tps, "supervised_tokens_per_s": supervised / seconds,
            "flops_per_s": flops_per_token * tps, "mfu": flops_per_token * tps / peak,
            "peak_mem_mb": raw["peak_rss_mb"], "final_loss": raw["final_loss"],
            "losses": [s["loss"] for s in steps], "step_tokens": [s["tokens"] for s in steps],
            "step_supervised": [s["supervised"] for s in steps]}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("chatft", "torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def run_parent(args: argparse.Namespace) -> None:
    import torch

    spec = WORKLOADS[args.workload]
    systems = ["chatft"] + [p for p in (args.peers or "").split(",") if p]
    out = Path(args.out).resolve()
    work = out / f"{args.workload}.work"
    model = model_dir()
    global_batch = spec["local_batch"] * spec["accumulation"]
    data, data_info = prepare_rows(model, spec, global_batch * args.steps, work)
    print(f"data: {data_info}", flush=True)
    peaks = [measure_peak_flops()]
    counts = count_params(model, spec)
    n = counts["params"]
    if spec["lora"]:
        flops_per_token = 4 * n + 6 * counts["lora_params"]
        formula = ("LoRA: 2*N (forward) + 2*N (backward through activations) + 6*N_lora (adapter weights, fwd+bwd) "
                   f"per non-padding token; N={n:,} (all base params, tied embedding once), N_lora={counts['lora_params']:,}")
    else:
        flops_per_token = 6 * n
        formula = f"full SFT: 6*N per non-padding token; N={n:,} (all params, tied embedding counted once)"

    raws: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for r in range(args.repeats):
        order = systems if r % 2 == 0 else list(reversed(systems))
        for system in order:
            result_path = work / f"{system}_r{r}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--workload", args.workload,
                   "--steps", str(args.steps), "--model", str(model), "--data", str(data),
                   "--run-dir", str(work / f"run_{system}_r{r}"), "--result", str(result_path), "--out", str(out)]
            began = time.monotonic()
            log = work / f"{system}_r{r}.log"
            with log.open("w") as fh:
                proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, check=False,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode:
                raise SystemExit(f"{system} repeat {r} failed (rc {proc.returncode}); see {log}")
            raws[system].append(json.loads(result_path.read_text()))
            shutil.rmtree(work / f"run_{system}_r{r}", ignore_errors=True)  # chatft's final/ is a full model copy
            print(f"repeat {r} {system}: {time.monotonic() - began:.0f}s wall", flush=True)
    peaks.append(measure_peak_flops())
    peak = max(peaks)

    probe = probe_assistant_only_loss(model, data, work) if "trl" in systems else None

    result_systems: dict[str, Any] = {}
    for system in systems:
        per = [summarise(raw, args.warmup, flops_per_token, peak) for raw in raws[system]]
        keys = ["tokens_per_s", "supervised_tokens_per_s", "flops_per_s", "mfu", "peak_mem_mb", "final_loss"]
        med = {k: statistics.median(p[k] for p in per) for k in keys}
        result_systems[system] = {**med, "repeats": per, "threads": raws[system][0].get("threads"),
                                  "rows_used": raws[system][0].get("rows_used")}
    ratio = {}
    for peer in systems[1:]:
        ratio[f"chatft/{peer}"] = {k: result_systems["chatft"][k] / result_systems[peer][k]
                                   for k in ("tokens_per_s", "supervised_tokens_per_s", "mfu", "peak_mem_mb")
                                   if result_systems[peer][k]}

    notes = [
        f"FLOP formula: {formula}; attention score FLOPs and padding positions are not counted.",
        (f"device peak: best of 5 float32 2048x2048 matmuls, measured before and after the runs "
        f"({', '.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s; the higher is used)."),
        (f"timing: wall clock from the end of step {args.warmup} to the end of step {args.steps} "
        f"({args.steps - args.warmup} timed steps), inside one process per system per repeat; systems alternate "
        "order per repeat; medians over repeats."),
        "peak_mem_mb: peak RSS (ru_maxrss) of the worker process, model load and data preparation included.",
        ("loss compared: completion loss on the LAST assistant turn (chatft dataset.train_on=last_assistant; TRL "
        "prompt/completion conversational rows, prompt = all messages before the last, completion_only_loss=True). "
        "Both divide the summed token cross-entropy by the supervised tokens of the whole optimizer step."),
        f"rows: {data_info}",
        ("row order: both sequential over the same file (chatft dataloader.shuffle=false; TRL "
        "train_sampling_strategy='sequential'), so step k trains rows 8k..8k+7 in both."),
    ]
    if probe is not None:
        notes.append(f"TRL assistant_only_loss=True on messages rows: {probe}")
    if "trl" in systems:
        c, t = result_systems["chatft"]["repeats"][0], result_systems["trl"]["repeats"][0]
        if c["step_tokens"] != t["step_tokens"]:
            notes.append(f"non-padding tokens per step differ: chatft {c['step_tokens']} vs trl {t['step_tokens']}")
        else:
            notes.append("non-padding tokens per step are identical in both systems")
        if c["step_supervised"] != t["step_supervised"]:
            notes.append(f"supervised tokens per step differ: chatft {c['step_supervised']} vs trl "
                         f"{t['step_supervised']} (TRL's completion is everything after the rendered prompt, so it "
                         "also supervises the newline the template writes after <|im_end|>; chatft stops at <|im_end|>)")
        notes.append(f"TRL settings as seen inside its trainer: {raws['trl'][0].get('checks')}")
        notes += [
            ("not matched (by design, each system's default path): TRL 1.16 computes the loss through the model's "
            "fused LM head (fused_lm_head=True: per-token log-probs, entropy and top-1 for its logged metrics) and "
            "calls .item() on metrics every micro-batch; chatft materialises the logits and takes cross-entropy over "
            "supervised positions. Both costs are inside the timings."),
            *([("not matched: LoRA adapter initialisation draws from different RNG states (chatft seeds just before "
            "get_peft_model; TRL wraps inside SFTTrainer after its own seeding), so initial adapters differ and "
            "later losses agree only approximately; LoRA B=0 at init, so the step-1 model is the same in both and "
            "the step-1 loss gap is the extra supervised newline token alone.")] if spec["lora"] else
              [("full SFT: same initial weights in both, so the step-1 loss gap is the extra supervised newline "
               "token alone; later steps also differ because that token changes the gradients.")]),
            ("not matched: weight-decay grouping rules differ (chatft: no decay on norms/biases/1-d; HF: no decay on "
            "norm layers and biases); weight_decay=0.0 here, so it has no effect."),
            ("not matched: HF Trainer pads each micro-batch in its collator (TRL DataCollatorForLanguageModeling, "
            "right padding); chatft pads to the longest row per micro-batch too: equal widths, different code."),
        ]
    report = {"workload": args.workload, "device": f"cpu ({platform.processor() or platform.machine()}, "
                                                    f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
              "versions": versions(), "settings": {**spec, "steps": args.steps, "warmup": args.warmup,
                                                   "repeats": args.repeats, "dtype": "float32",
                                                   "activation_checkpointing": False, **OPTIMIZER,
                                                   "lr_schedule": "constant, no warm-up", "seed": SEED},
              "peak_flops": peak, "flops_per_token": flops_per_token, "flop_formula": formula,
              "systems": result_systems, "ratio": ratio, "notes": notes}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.workload}.json").write_text(json.dumps(report, indent=1))
    print(f"\n{args.workload}: {out / (args.workload + '.json')}")
    print(f"{'system':8} {'tok/s':>8} {'sup tok/s':>9} {'GFLOP/s':>8} {'MFU':>7} {'peak MB':>8} {'loss':>7}")
    for system, s in result_systems.items():
        print(f"{system:8} {s['tokens_per_s']:8.1f} {s['supervised_tokens_per_s']:9.1f} {s['flops_per_s'] / 1e9:8.2f} "
              f"{s['mfu']:7.3f} {s['peak_mem_mb']:8.0f} {s['final_loss']:7.4f}")
    for name, r in ratio.items():
        print(name, {k: round(v, 3) for k, v in r.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--peers", default="trl", help="comma-separated peers (only 'trl'); '' for chatft alone")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", required=True)
    # worker-only
    parser.add_argument("--worker", choices=["chatft", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.worker and args.warmup >= args.steps:
        parser.error("--warmup must be smaller than --steps")
    if args.peers and set(args.peers.split(",")) - {"trl"}:
        parser.error("the only peer is trl")
    run_worker(args) if args.worker else run_parent(args)


if __name__ == "__main__":
    main()
