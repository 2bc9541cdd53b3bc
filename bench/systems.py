"""The systems measured, each run by `bench/run.py --worker SYSTEM` in a fresh process.

Every worker trains `settings.steps` optimizer steps and returns, per step, when it ended, its loss, and
what it trained, counted from the rows the system itself built: conversations, non-padding tokens,
supervised tokens (labelled positions after the one-token shift) and Σ L² (for the attention FLOPs). It
also returns a digest of every trained conversation's token ids in order, so the report can show that
two systems trained exactly the same tokens in the same order.

- chatft: chatft's own `train()` on a `TrainingConfig` tree, chatft's defaults for everything not matched;
  `chatft-padded` adds `packed_sequence.padding_free=false`, `chatft-bf16` sets `model.torch_dtype=bfloat16`,
  `chatft-compile` sets `compile.enabled=true` (the compile happens in the warm-up steps), `chatft-packed` sets
  `packed_sequence.packed_sequence_size` to local batch x max length (the padded layout's worst case), so a
  micro-batch is as many whole conversations of the step as fit: fewer, larger matmuls.
- trl: `SFTTrainer` with its defaults except what must match (rows and order, batch, length limit, optimizer,
  schedule, clipping, seed, precision, activation checkpointing; `packing=False`, `padding_free=False`);
  `trl-packed`: `packing=True` with its default strategy; `trl-padding-free`: `padding_free=True`, no packing.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from bench import profile
from bench.workloads import RunSettings
from chatft.run_layout import METRICS_FILE

CHATFT_SYSTEMS = ("chatft", "chatft-padded", "chatft-bf16", "chatft-compile", "chatft-packed", "chatft-keep-all")
TRL_SYSTEMS = ("trl", "trl-packed", "trl-padding-free")
SYSTEMS = CHATFT_SYSTEMS + TRL_SYSTEMS
IGNORE_INDEX = -100
MB = 1024 * 1024


def compute_dtype(system: str, settings: RunSettings) -> str:
    return "bfloat16" if system == "chatft-bf16" else settings.dtype


class StepCounter:
    """Per-step counts of what a system trained, and a digest of the token ids in training order."""

    def __init__(self) -> None:
        self.steps: list[dict[str, int]] = []
        self.lengths: list[int] = []
        self.digest = hashlib.sha256()

    def add_step(self, conversations: list[tuple[list[int], list[bool]]]) -> None:
        """`conversations`: (token ids, supervised flag per token) of each conversation of one step."""
        record = {"conversations": 0, "tokens": 0, "supervised": 0, "squared_lengths": 0}
        for ids, supervised in conversations:
            record["conversations"] += 1
            record["tokens"] += len(ids)
            record["supervised"] += sum(bool(s) for s in supervised[1:])  # position 0 is never predicted
            record["squared_lengths"] += len(ids) ** 2
            self.lengths.append(len(ids))
            self.digest.update(len(ids).to_bytes(4, "little"))
            self.digest.update(b"".join(int(t).to_bytes(4, "little") for t in ids))
        self.steps.append(record)


def checkpointing_on(model: Any) -> bool:
    """Whether any layer of the trained model recomputes its activations (read back, not assumed)."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / MB
    from chatft.train.memory import peak_rss  # the same ru_maxrss reading chatft logs, for every system

    return peak_rss() / MB


# --------------------------------------------------------------------------- chatft


def chatft_tree(system: str, settings: RunSettings, run_dir: Path) -> dict[str, Any]:
    s, opt = settings, settings.optimizer
    tree: dict[str, Any] = {
        "seed": s.seed,
        "model": {"pretrained_model_name_or_path": s.model_dir, "torch_dtype": compute_dtype(system, s),
                  "attn_implementation": s.attn_implementation},
        # Every row has one assistant turn, so last_assistant and all_assistant supervise the same tokens;
        # last_assistant says what TRL's completion-only loss is compared against.
        "dataset": {"path_or_dataset_id": s.rows, "seq_length": s.max_length, "truncation": "drop",
                    "train_on": "last_assistant"},
        "dataloader": {"shuffle": False, "group_by_length": False, "num_workers": 0},
        "step_scheduler": {"global_batch_size": s.global_batch, "local_batch_size": s.local_batch,
                           "max_steps": s.steps, "num_epochs": 1, "ckpt_every_steps": None, "val_every_steps": None},
        "optimizer": {"lr": s.lr, "weight_decay": opt["weight_decay"], "betas": list(opt["betas"]), "eps": opt["eps"]},
        "lr_scheduler": {"lr_warmup_steps": 0, "lr_decay_style": "constant"},
        "clip_grad_norm": {"max_norm": opt["max_grad_norm"]},
        "checkpoint": {"checkpoint_dir": str(run_dir), "enabled": False, "overwrite": True},
        # Where the workload recomputes nothing, chatft keeps its default (auto: selective recomputation of cheap
        # ops for full SFT on CPU, which TRL has no counterpart of); chatft-keep-all turns that off too.
        "distributed": {"activation_checkpointing": True if s.activation_checkpointing else "auto"},
        "peft": ({"dim": s.lora_r, "alpha": s.lora_alpha, "dropout": 0.0, "target_modules": list(s.lora_targets)}
                 if s.lora else None),
        "force": True,  # the memory estimate is chatft's own guess; the benchmark wants the real number
    }
    if system == "chatft-padded":
        tree["packed_sequence"] = {"padding_free": False}
    if system == "chatft-compile":
        tree["compile"] = {"enabled": True}
    if system == "chatft-packed":
        tree["packed_sequence"] = {"packed_sequence_size": s.local_batch * s.max_length}
    if system == "chatft-keep-all" and not s.activation_checkpointing:
        tree["distributed"] = {"activation_checkpointing": False}
    return tree


def run_chatft(system: str, settings: RunSettings, run_dir: Path) -> dict[str, Any]:
    import torch
    from pydantic import ValidationError

    from chatft.config.schema import TrainingConfig
    from chatft.data.pipeline import prepare_training_data
    from chatft.train import attention
    from chatft.train.loop import Trainer
    from chatft.train.model import load_tokenizer
    from chatft.train.step import train

    tree = chatft_tree(system, settings, run_dir)
    try:
        cfg = TrainingConfig.model_validate(tree)
    except ValidationError as exc:
        changed = tree.get("packed_sequence") or {"model.torch_dtype": tree["model"]["torch_dtype"]}
        raise SystemExit(f"{system}: chatft's config schema refuses this variant's settings {changed}:\n"
                         f"{exc}") from None
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_training_data(cfg.dataset, tokenizer, use_cache=False, log=lambda line: None)
    expected = settings.global_batch * settings.steps
    if data.report.rows_used != expected:
        raise SystemExit(f"{system}: {data.report.rows_used} usable rows, expected all {expected}")
    counter = StepCounter()
    batch = settings.global_batch
    for k in range(settings.steps):  # shuffle=false: step k trains rows k*batch .. (k+1)*batch - 1
        counter.add_step([(row.input_ids, row.loss_mask) for row in data.rows[k * batch:(k + 1) * batch]])
    # chatft's one entry into training; the result keeps the trainer, whose model and layout are read below.
    with profile.around_method(Trainer, "train", settings.workload, system, settings.device):
        result = train(cfg, run_dir, data, tokenizer=tokenizer)
    trainer = result.trainer
    metrics = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    logged_tokens = [m["tokens"] for m in metrics]
    padding_free = getattr(trainer, "padding_free", None)
    return {
        "steps": [{"step": m["step"], "end_s": m["elapsed_s"], "loss": m["loss"], **counter.steps[i]}
                  for i, m in enumerate(metrics)],
        "final_loss": result.train_loss,
        "logged_tokens": logged_tokens,
        "logged_tokens_match": logged_tokens == [s["tokens"] for s in counter.steps],
        "lengths": counter.lengths,
        "tokens_sha256": counter.digest.hexdigest(),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "layout": {True: "padding-free rows", False: "padded to the longest row per micro-batch"}.get(
            padding_free, "not reported by this chatft version"),
        "dtype": compute_dtype(system, settings),
        "threads": torch.get_num_threads(),
        "checks": {"packed_sequence": cfg.packed_sequence.model_dump(),
                   "activation_checkpointing": trainer.recompute or False,
                   "model_dtype": str(next(trainer.model.parameters()).dtype),
                   "attn_implementation": cfg.model.attn_implementation, "device": str(trainer.device),
                   "attention_kernels": attention.kernel_use_of(trainer.model),
                   "model_checkpointing_after_train": checkpointing_on(trainer.model),
                   # chatft's own guess before loading (force only skips the refusal); the report sets it
                   # against the measured peak
                   "memory_estimate_mb": round(trainer.estimate.total / MB, 1) if trainer.estimate else None},
    }


# --------------------------------------------------------------------------- TRL


def trl_rows(path: str) -> list[dict[str, Any]]:
    """Prompt/completion conversational rows: the completion is the last (assistant) message, which is what
    chatft's `train_on: last_assistant` supervises."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]


def trl_conversations(example: dict[str, Any]) -> list[tuple[list[int], list[bool]]]:
    """The conversations of one prepared TRL example: a pack holds several (`seq_lengths`), a row one."""
    ids, labels = example["input_ids"], example["labels"]
    lengths = example.get("seq_lengths") or [len(ids)]
    out, start = [], 0
    for length in lengths:
        out.append((ids[start:start + length], [label != IGNORE_INDEX for label in labels[start:start + length]]))
        start += length
    return out


def run_trl(system: str, settings: RunSettings, run_dir: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    s, opt = settings, settings.optimizer
    packing, padding_free = system == "trl-packed", system == "trl-padding-free"
    cuda = s.device == "cuda"
    torch.manual_seed(s.seed)
    tokenizer = AutoTokenizer.from_pretrained(s.model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # the filler chatft uses too
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[s.dtype]
    if not s.lora:  # bf16 full SFT as mixed precision, as chatft trains it: float32 weights, bf16=True autocast
        dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(s.model_dir, dtype=dtype, attn_implementation=s.attn_implementation)
    model.config.use_cache = False
    dataset = Dataset.from_list(trl_rows(s.packed_pool if packing else s.rows))
    peft_config = None
    if s.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0,
                                 target_modules=list(s.lora_targets), bias="none", task_type="CAUSAL_LM")
    config = SFTConfig(
        output_dir=str(run_dir), max_steps=s.steps, num_train_epochs=1,
        per_device_train_batch_size=s.local_batch, gradient_accumulation_steps=s.accumulation,
        learning_rate=s.lr, lr_scheduler_type="constant", warmup_steps=0,
        # Fused AdamW on CPU and CUDA alike: chatft's optimizer, and TRL's own default since torch 2.8.
        optim="adamw_torch_fused",
        adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1], adam_epsilon=opt["eps"],
        weight_decay=opt["weight_decay"], max_grad_norm=opt["max_grad_norm"],
        bf16=s.dtype == "bfloat16", fp16=False, use_cpu=not cuda,
        activation_checkpointing=s.activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if s.activation_checkpointing else None,
        packing=packing, padding_free=padding_free,
        # TRL refuses padding_free without packing unless max_length is None (it would not enforce it);
        # the rows were already checked to fit, so nothing is cut either way.
        max_length=None if padding_free else s.max_length,
        completion_only_loss=True, assistant_only_loss=False,
        train_sampling_strategy="sequential", seed=s.seed, data_seed=s.seed,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class StepClock(TrainerCallback):
        """Wall time at the end of every optimizer step (after a CUDA sync, so queued work is counted)."""

        def __init__(self) -> None:
            self.t0 = time.monotonic()
            self.ends: dict[int, float] = {}
            self.logs: dict[int, dict[str, float]] = {}

        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.monotonic()

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends[state.global_step] = self._now() - self.t0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:  # the end-of-training summary arrives under the last step too: merge, never replace
                self.logs.setdefault(state.global_step, {}).update(
                    {k: v for k, v in logs.items() if k not in self.logs.get(state.global_step, {})})

    clock = StepClock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])
    per_step = s.global_batch  # rows (or packs) per optimizer step
    prepared = trainer.train_dataset
    if packing:
        if len(prepared) < s.packs_needed:
            raise SystemExit(f"trl-packed: {len(prepared)} packs from {len(dataset)} rows, {s.packs_needed} needed")
        # The first packs of its own packing order; the rest of the pool is not trained.
        prepared = trainer.train_dataset = prepared.select(range(s.packs_needed))
    elif len(prepared) != per_step * s.steps:
        raise SystemExit(f"{system}: TRL kept {len(prepared)} of {len(dataset)} rows")
    examples = list(prepared)
    counter = StepCounter()
    for k in range(s.steps):  # sequential sampling: step k trains examples k*per_step .. (k+1)*per_step - 1
        counter.add_step([c for ex in examples[k * per_step:(k + 1) * per_step] for c in trl_conversations(ex)])
    checks = {"activation_checkpointing": trainer.args.activation_checkpointing, "bf16": trainer.args.bf16,
              "model_dtype": str(next(trainer.model.parameters()).dtype), "optim": str(trainer.args.optim),
              "lr_scheduler": str(trainer.args.lr_scheduler_type), "packing": trainer.args.packing,
              "packing_strategy": trainer.args.packing_strategy, "padding_free": trainer.padding_free,
              "max_length": trainer.args.max_length, "completion_only_loss": trainer.completion_only_loss,
              "attn_implementation": trainer.model.config._attn_implementation,
              "device": str(trainer.args.device), "columns": prepared.column_names}
    with profile.training_window(s.workload, system, s.device):
        trainer.train()
    checks["model_checkpointing_after_train"] = checkpointing_on(trainer.model)
    # TRL logs `num_tokens`, its own running count of tokens fed to the model (attention-mask tokens when
    # padded, the flattened row length when padding-free): kept per step as a check on the counts above.
    logged_tokens: list[int | None] = []
    previous = 0
    for step in sorted(clock.ends):
        total = clock.logs.get(step, {}).get("num_tokens")
        logged_tokens.append(None if total is None else int(total) - previous)
        previous = int(total) if total is not None else previous
    if packing:
        layout = f"packs of up to {s.max_length} tokens ({trainer.args.packing_strategy}), padding-free"
    else:
        layout = "padding-free rows" if trainer.padding_free else "padded to the longest row per micro-batch"
    steps = [{"step": step, "end_s": clock.ends[step], "loss": clock.logs.get(step, {}).get("loss"),
              **counter.steps[step - 1]} for step in sorted(clock.ends)]
    return {
        "steps": steps,
        "final_loss": steps[-1]["loss"] if steps else None,
        "logged_tokens": logged_tokens,
        "logged_tokens_match": logged_tokens == [c["tokens"] for c in counter.steps],
        "lengths": counter.lengths,
        "tokens_sha256": counter.digest.hexdigest(),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "layout": layout,
        "dtype": s.dtype,
        "threads": torch.get_num_threads(),
        "checks": checks,
        "assistant_only_loss_probe": probe_assistant_only_loss(tokenizer, s) if system == "trl" else None,
    }


def probe_assistant_only_loss(tokenizer: Any, settings: RunSettings) -> str:
    """Would TRL's `assistant_only_loss=True` work on the `messages` rows with this tokenizer's template?
    The answer depends on the template alone, so a two-layer model stands in for the real one."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(settings.rows).read_text().splitlines()[:4]]
    stand_in = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1,
                                            vocab_size=len(tokenizer))).to(torch.float32)
    # Same device and precision as the run just trained: accelerate's state is per process and cannot change.
    config = SFTConfig(output_dir=str(Path(settings.rows).parent / "probe"), assistant_only_loss=True, max_steps=1,
                       use_cpu=settings.device != "cuda", bf16=settings.dtype == "bfloat16", report_to="none",
                       max_length=settings.max_length)
    try:
        SFTTrainer(model=stand_in, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    except Exception as exc:  # noqa: BLE001 - the refusal is the finding
        return f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:400]}"
    return "accepted (TRL built assistant masks for this template)"


def run_system(system: str, settings: RunSettings, run_dir: Path) -> dict[str, Any]:
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runner = run_chatft if system in CHATFT_SYSTEMS else run_trl
    result = runner(system, settings, run_dir)
    result["peak_mem_mb"] = peak_memory_mb(settings.device)
    result["system"] = system
    return result
