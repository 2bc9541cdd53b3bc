"""A plan's configs, commands and report.

In: a `Plan`. Out: per step, the settings it needs (`step_settings`), written as a YAML file that inherits
the step's shipped `default.yaml` (by absolute path) and holds only the keys that differ from it; the
command that runs it; the report, as terminal text or as `plan.md` (with the chain as a Mermaid flowchart).
Every written config is compiled before the plan calls it ready: one that does not compile is a planner bug.
Paths in the configs are absolute (inputs) or under the plan dir (outputs), so the commands run from anywhere.

On several GPUs `chatft run --nproc-per-node G` trains replicated (DDP, which the ladder prefers) or FSDP2-sharded
(`plan.fit.strategy`), and its memory check before training is the same per-process estimate the plan sized the
run by. The training config is sized for the plan's data-parallel size, names its strategy, and its command
starts the processes: `--nproc-per-node G`, and on each of K machines also `--nnodes K --node-rank R
--rdzv-endpoint HOST:PORT` (placeholders that plan.md explains).
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import yaml

from chatft.config.compile import compile_config
from chatft.config.loader import load_with_defaults
from chatft.plan import Plan
from chatft.plan.chain import PlannedStep
from chatft.plan.fit import GB, GpuEstimate, Layout, estimate
from chatft.steps.registry import all_steps
from chatft.train.distributed import strategy_for

DEFAULT_GLOBAL_BATCH = 32
VAL_FRACTION = 0.05
MIN_ROWS_FOR_VALIDATION = 100
LORA_LR = 1.0e-4  # what peft/automodel's default.yaml uses; sft/automodel's 1e-5 is for full SFT
# What the user puts in a several-machine training command: this machine's node rank, and the rendezvous.
NODE_RANK = "R"
RDZV_ENDPOINT = "HOST:PORT"
CONFIG_NAMES = {"prep": "data_prep", "eval_before": "eval_before", "merge": "merge_lora", "eval_after": "eval_after"}


# --------------------------------------------------------------------------- settings per step


def _paths(plan: Plan) -> dict[str, str | None]:
    """Where each step reads and writes."""
    out, data, decision = plan.out, plan.facts.data, plan.decision
    if decision.prep:
        rows = str(out / "data" / "train.jsonl")
        enough = data.kind == "hub" or (data.rows_clean or 0) >= MIN_ROWS_FOR_VALIDATION
        val = str(out / "data" / "val.jsonl") if enough else None
    else:
        rows = str(Path(data.path).expanduser().resolve()) if data.path else "data/train.jsonl"
        val = None
    train_dir = out / "runs" / ("peft" if decision.train_step == "peft/automodel" else "lora" if decision.lora else "sft")
    return {"rows": rows, "val": val, "train_dir": str(train_dir), "merged": str(out / "runs" / "merged"),
            "eval_before": str(out / "runs" / "eval-before"), "eval_after": str(out / "runs" / "eval-after")}


def global_batch(local: int, world: int) -> int:
    """The step default (32) rounded up to a multiple of local_batch_size x data-parallel size."""
    unit = local * world
    return max(1, math.ceil(DEFAULT_GLOBAL_BATCH / unit)) * unit


def procs_per_node(layout: Layout) -> int:
    """Training processes on each machine: one per GPU (one on a CPU machine)."""
    return max(layout.gpus, 1)


def replicated_floor(plan: Plan) -> GpuEstimate:
    """The smallest ask of the chosen mode replicated (DDP): the ladder's last rung, local_batch_size 1 (or the
    one the user fixed) with activation checkpointing. Shown when even that does not fit."""
    facts = plan.facts
    return estimate(facts.model, facts.layout, lora=plan.decision.lora, seq_length=facts.seq_length,
                    local_batch_size=plan.request.local_batch_size or 1, activation_checkpointing=True,
                    strategy="ddp" if facts.layout.world > 1 else None, quantization=plan.decision.quantization)


def step_settings(plan: Plan, step: PlannedStep) -> dict[str, Any]:
    """Dotted key -> value: what this step needs, before dropping what its default.yaml already says."""
    facts, decision, paths = plan.facts, plan.decision, _paths(plan)
    layout, fit = facts.layout, plan.fit
    eval_rows = paths["val"] or paths["rows"]
    if step.role == "prep":
        return {"input": str(Path(facts.data.path).expanduser().resolve()) if facts.data.kind == "file" else facts.data.path,
                "output": paths["rows"], "format": facts.data.format or "auto",
                "val_fraction": VAL_FRACTION if paths["val"] else 0.0, "validation_output": paths["val"]}
    if step.role in ("eval_before", "eval_after"):
        targets = ["base"]
        settings: dict[str, Any] = {"base": facts.model.location}
        if step.role == "eval_after":
            if decision.lora:
                targets.append("adapter")
                settings["adapter"] = f"{paths['train_dir']}/final"
            if decision.merge or not decision.lora:
                targets.append("merged")
                settings["merged"] = paths["merged"] if decision.merge else f"{paths['train_dir']}/final"
        return {"targets": targets, **settings, "dataset.path_or_dataset_id": eval_rows,
                "dataset.seq_length": facts.seq_length, "torch_dtype": layout.dtype,
                "output_dir": paths["eval_before" if step.role == "eval_before" else "eval_after"]}
    if step.role == "merge":
        return {"lora_checkpoint": paths["train_dir"], "output_hf_path": paths["merged"]}
    assert step.role == "train" and fit is not None
    # Sized for the whole layout: grad accumulation = global / (local x world) must divide exactly.
    settings = {
        "model.pretrained_model_name_or_path": facts.model.location,
        "model.torch_dtype": layout.dtype,
        "dataset.path_or_dataset_id": paths["rows"],
        "dataset.seq_length": facts.seq_length,
        "step_scheduler.local_batch_size": fit.local_batch_size,
        "step_scheduler.global_batch_size": global_batch(fit.local_batch_size, layout.world),
        "distributed.activation_checkpointing": fit.activation_checkpointing,
        "checkpoint.checkpoint_dir": paths["train_dir"],
    }
    if fit.strategy != strategy_for(None, layout.world, fit.lora):  # `auto` would shard (or replicate) otherwise
        settings["distributed.strategy"] = fit.strategy
    if layout.nodes > 1:
        settings["run.env.nodes"] = layout.nodes
    if layout.gpus > 1:
        settings["run.env.nprocs_per_node"] = layout.gpus
    if paths["val"]:
        settings["validation_dataset.path_or_dataset_id"] = paths["val"]
    if decision.lora and step.id == "sft/automodel":
        settings["peft"] = "lora"
        settings["optimizer.lr"] = LORA_LR
    if decision.quantization:
        settings["model.quantization"] = decision.quantization
    return settings


def _default_config(step_id: str) -> tuple[Path, dict[str, Any]]:
    path = all_steps()[step_id].config_dir / "default.yaml"
    return path, load_with_defaults(path)[0]


def _lookup(config: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return False, None
        config = config[part]
    return True, config


def differing(step_id: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The nested mapping of the settings whose value differs from the shipped default's."""
    _, default = _default_config(step_id)
    nested: dict[str, Any] = {}
    for dotted, value in settings.items():
        present, current = _lookup(default, dotted)
        if present and current == value:
            continue
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def config_text(plan: Plan, step: PlannedStep) -> str:
    default_path, _ = _default_config(step.id)
    body = differing(step.id, step_settings(plan, step))
    header = f"# {step.id}, written by `chatft plan`: the shipped default.yaml plus only the keys that differ.\n"
    layout = plan.facts.layout
    if step.role == "train" and layout.nodes > 1:
        header += (f"# Run on each of the {layout.nodes} machines at once, with R its node rank "
                   f"(0..{layout.nodes - 1}) and HOST:PORT a free port\n# on the machine with node rank 0 "
                   "(see plan.md):\n"
                   f"#   {command(plan, step, Path('THIS_FILE.yaml'))}\n")
    else:
        header += f"# Run: {command(plan, step, Path('THIS_FILE.yaml'))}\n"
    document = {"defaults": str(default_path), **body}
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=True)


def config_path(plan: Plan, index: int, step: PlannedStep) -> Path:
    name = CONFIG_NAMES.get(step.role) or step.id.split("/")[0]
    return plan.out / f"{index}-{name}.yaml"


def command(plan: Plan, step: PlannedStep, path: Path) -> str:
    """The step's `chatft run`. Training on several GPUs names its processes on the command line as well as in
    the config (`run.env.*`), so the command says how it runs; on several machines each one runs it with its own
    node rank `R` and the rendezvous `HOST:PORT`, placeholders the user fills in. Other steps use one process."""
    argv = ["chatft", "run", step.id, "-c", str(path)]
    layout = plan.facts.layout
    if step.role == "train" and layout.world > 1:
        argv += ["--nproc-per-node", str(procs_per_node(layout))]
        if layout.nodes > 1:
            argv += ["--nnodes", str(layout.nodes), "--node-rank", NODE_RANK, "--rdzv-endpoint", RDZV_ENDPOINT]
    return shlex.join(argv)


def write(plan: Plan) -> list[tuple[PlannedStep, Path]]:
    """Write each step's config and plan.md under the plan dir; check each config compiles."""
    plan.out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, step in enumerate(plan.chain.steps, start=1):
        path = config_path(plan, index, step)
        path.write_text(config_text(plan, step).replace("THIS_FILE.yaml", str(path)))
        compile_config(all_steps()[step.id], str(path))  # a planner bug if this raises
        written.append((step, path))
    (plan.out / "plan.md").write_text(render(plan, written=written, markdown=True))
    return written


# --------------------------------------------------------------------------- the report


def _where(layout: Layout) -> str:
    nodes = f" x {layout.nodes} nodes" if layout.nodes > 1 else ""
    return (f"{layout.gpus} GPU{'s' if layout.gpus != 1 else ''}" if layout.gpus else "CPU") + nodes


def layout_words(plan: Plan, fit: GpuEstimate) -> str:
    """How `fit` spreads over the layout, for the decision line."""
    world = plan.facts.layout.world
    if world == 1:
        return ""
    if fit.strategy == "fsdp2":
        return f", FSDP2-sharded over {world} GPUs"
    return f", on {world} processes (DDP, replicated)"


def decision_line(plan: Plan) -> str:
    d, fit = plan.decision, plan.fit
    if not d.in_chatft:
        return "outside chatft: Megatron-Bridge" + (" (refused for chatft)" if d.refusal else "") + ", for the reasons below"
    if d.train_step == "peft/automodel":
        what = "a LoRA adapter with `peft/automodel`"
    elif d.lora:
        what = "LoRA with `sft/automodel peft=lora`"
    else:
        what = "full SFT with `sft/automodel`"
    if d.quantization:
        what += f" on the base loaded in 4-bit {d.quantization.upper()} (QLoRA, `model.quantization={d.quantization}`)"
    extras = [s for s, on in (("`data_prep/chat_jsonl` first", d.prep),
                              ("`convert/merge_lora` to a standalone model", d.merge),
                              ("`eval/model_eval` before and after", d.eval)) if on]
    settings = f" at seq_length {plan.facts.seq_length}, {fit.settings()}{layout_words(plan, fit)}" if fit else ""
    return f"HF-native: {what}{settings}" + (f"; {'; '.join(extras)}" if extras else "")


def memory_lines(plan: Plan) -> list[str]:
    """Both modes at the chosen settings: on one GPU as one process; on several replicated (DDP, what
    `chatft run --nproc-per-node` does), and FSDP2-sharded too where replicated does not fit."""
    facts, fit = plan.facts, plan.fit
    layout = facts.layout
    local = fit.local_batch_size if fit else facts.local_batch_size
    checkpointing = fit.activation_checkpointing if fit else False
    lines = [f"memory per GPU at seq_length {facts.seq_length}, local_batch_size {local} ({layout.dtype}, "
             f"{_where(layout)}, {layout.memory / GB:,.0f} GB each; LoRA r=16 on every linear layer):"]
    for lora in (False, True):
        strategies = ["ddp", "fsdp2"] if layout.world > 1 else [None]
        for strategy in strategies:
            result = estimate(facts.model, layout, lora=lora, seq_length=facts.seq_length, local_batch_size=local,
                              activation_checkpointing=checkpointing, strategy=strategy)
            lines.append(f"  {result.line()}")
            if result.fits:  # replicated fits: sharding is not needed
                break
    if fit is not None and fit.quantization:
        lines.append(f"  {fit.line()}")
    if fit is not None and fit.strategy == "fsdp2":
        lines.append(f"  replicated, no rung of the ladder fits; the smallest: {replicated_floor(plan).line()}")
    if fit is not None and fit.lora and facts.full_fit is not None:
        full = facts.full_fit
        sharded = ", FSDP2-sharded" if full.strategy == "fsdp2" else ""
        lines.append(f"  full SFT also fits at {full.settings()}{sharded} ({full.total / GB:,.1f} GB per GPU): the "
                     "next step once the adapter plateaus, with peft=null optimizer.lr=1e-5")
    if plan.memory_assumed:
        lines.append(f"  assumed: {plan.memory_assumed}")
    lines.append("  (the training engine's own estimate, chatft.train.memory; `chatft preview -c CONFIG` measures "
                 "real token lengths)")
    return lines


def render(plan: Plan, written: list[tuple[PlannedStep, Path]] | None, markdown: bool) -> str:
    facts, decision = plan.facts, plan.decision
    model, data = facts.model, facts.data
    head = "## " if markdown else ""
    bullet = "- " if markdown else "  "
    code = "`" if markdown else ""
    layout = facts.layout
    gpus = f"{layout.gpus} x {layout.memory / GB:,.0f} GB GPU{'s' if layout.gpus != 1 else ''}" if layout.gpus else "CPU"
    title = f"chatft plan: {model.given} on {gpus}" + (f", {layout.nodes} nodes" if layout.nodes > 1 else "")
    lines = [f"# {title}" if markdown else title, ""]
    lines += [f"{head}decision", f"{bullet}{decision_line(plan)}", ""]
    lines.append(f"{head}rules that fired")
    for rule, trigger in decision.fired:
        lines.append(f"{bullet}[{rule.id}] {rule.constraint} -> {rule.decision}")
        lines.append(f"{'  ' if markdown else '      '}because: {trigger}")
    lines.append("")
    lines.append(f"{head}facts")
    lines.append(f"{bullet}model: {model.given}: {model.shape_line()} [from: {model.source}]")
    lines += [f"{bullet}assumed: {a}" for a in model.assumptions]
    lines.append(f"{bullet}data: {data.summary()}")
    lines += [f"{bullet}note: {n}" for n in data.notes]
    over = data.over(facts.seq_length) if data.lengths else None
    lines.append(f"{bullet}seq_length {facts.seq_length}: {plan.seq_length_why}"
                 + (f"; {over} row(s) longer (dropped and counted with truncation=drop)" if over else ""))
    lines.append("")
    memory = memory_lines(plan)
    lines += [f"{head}{memory[0]}" if markdown else memory[0], *[f"{bullet}{m.strip()}" for m in memory[1:]], ""]
    if not decision.in_chatft:
        lines.append(f"{head}chain")
        lines.append(f"{bullet}none in chatft: this job belongs to NVIDIA Megatron-Bridge (outside chatft). "
                     "For a chatft run instead: a single node, a Hugging Face checkpoint as the output "
                     "(--want hf or --want adapter), chat data (JSONL/JSON/Parquet rows, not packed), a model that fits.")
        return "\n".join(lines).rstrip() + "\n"
    lines.append(f"{head}chain")
    if markdown:
        lines += ["```mermaid", plan.chain.mermaid(), "```"]
    else:
        lines += [f"  {edge.text()}" for edge in plan.chain.edges]
    lines.append("")
    if written is not None:
        where = plan.out
        lines.append(f"{head}configs (in {where})" if markdown else f"configs (in {where}):")
        lines += [f"{bullet}{code}{path.name}{code}: {step.id}" for step, path in written]
        if markdown:
            lines.append(f"{bullet}{code}plan.md{code}: this file")
        lines.append("")
        lines.append(f"{head}commands, in order" if markdown else "commands, in order:")
        if markdown:
            lines.append("```sh")
        lines += [("" if markdown else "  ") + command(plan, step, path) for step, path in written]
        if markdown:
            lines.append("```")
        lines += [f"{bullet}{line}" for line in layout_notes(plan, code)]
    return "\n".join(lines).rstrip() + "\n"


def layout_notes(plan: Plan, code: str) -> list[str]:
    """How the training command uses a layout of several GPUs or machines."""
    facts, fit = plan.facts, plan.fit
    layout = facts.layout
    if layout.world == 1 or fit is None:
        return []
    world, local = layout.world, fit.local_batch_size
    total = global_batch(local, world)
    how = ("FSDP2: each holds its shard of the weights, gradients and optimizer states and gathers a few layers "
           "whole at a time" if fit.strategy == "fsdp2" else
           "DDP: each holds the whole model, gradients and optimizer states")
    notes = [f"training runs as {world} processes, one per {'GPU' if layout.gpus else 'machine'} ({how}, "
             f"{fit.total / GB:,.1f} GB per GPU; gradients are summed across them): global_batch_size {total} = "
             f"local_batch_size {local} x {world} processes x {total // (local * world)} accumulation step(s); the "
             "other steps use one process"]
    if fit.strategy == "fsdp2":
        notes.append("checkpoints are written shard by shard (Distributed Checkpoint) into the run's checkpoints/ "
                     "dir; final/ is gathered into one standard checkpoint")
    if layout.nodes > 1:
        notes.append(
            f"on {layout.nodes} machines: run the training command on each of them at the same time, with "
            f"{code}{NODE_RANK}{code} replaced by that machine's node rank (0 to {layout.nodes - 1}) and "
            f"{code}{RDZV_ENDPOINT}{code} by a free port on the machine with node rank 0 that the others reach "
            f"(e.g. node0:29500). Every machine must see {plan.out} (and the data and model) at the same path, "
            "e.g. on a shared file system: the configs' paths are absolute. The other steps run on one machine, "
            "those before training first. On a Slurm cluster, instead: "
            f"{code}chatft run STEP -c CONFIG --launcher slurm --nodes {layout.nodes} --gpus-per-node "
            f"{procs_per_node(layout)}{code} writes and submits an sbatch script that does this")
    return notes
