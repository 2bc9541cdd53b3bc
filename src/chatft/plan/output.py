"""A plan's configs, commands and report.

In: a `Plan`. Out: per step, the settings it needs (`step_settings`), written as a YAML file that inherits
the step's shipped `default.yaml` (by absolute path) and holds only the keys that differ from it; the
command that runs it; the report, as terminal text or as `plan.md` (with the chain as a Mermaid flowchart).
Every written config is compiled before the plan calls it ready: one that does not compile is a planner bug.
Paths in the configs are absolute (inputs) or under the plan dir (outputs), so the commands run from anywhere.

This release trains on one process (several are `not_available_yet`), so a plan never writes a command
`chatft run` refuses: for a layout of several GPUs or nodes, the training config is sized for one GPU of it
(`one_process_fit`) and runs there; when the chosen mode fits only spread over the layout, that config keeps
the layout for the coming scale-out, and plan.md lists only the commands that run today.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import yaml

from chatft.plan import Plan
from chatft.plan.chain import PlannedStep
from chatft.plan.fit import GB, GpuEstimate, Layout, estimate, ladder
from chatft.steps.registry import all_steps

DEFAULT_GLOBAL_BATCH = 32
VAL_FRACTION = 0.05
MIN_ROWS_FOR_VALIDATION = 100
LORA_LR = 1.0e-4  # what peft/automodel's default.yaml uses; sft/automodel's 1e-5 is for full SFT
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


def one_process_layout(plan: Plan) -> Layout:
    """One GPU of the plan's layout (or the CPU): where this release trains."""
    layout = plan.facts.layout
    return Layout(min(layout.gpus, 1), 1, layout.memory)


def one_process_fit(plan: Plan) -> GpuEstimate | None:
    """The first rung of the ladder at which the chosen mode fits on one process, or None."""
    if plan.facts.layout.world == 1:
        return plan.fit
    facts = plan.facts
    return ladder(facts.model, one_process_layout(plan), lora=plan.decision.lora, seq_length=facts.seq_length,
                  local_batch_size=facts.local_batch_size, batch_fixed=plan.request.local_batch_size is not None)


def one_process_estimate(plan: Plan) -> GpuEstimate:
    """What one process needs: its fit, else the last rung of the ladder (the smallest ask), which does not fit."""
    fit = one_process_fit(plan)
    if fit is not None:
        return fit
    return estimate(plan.facts.model, one_process_layout(plan), lora=plan.decision.lora,
                    seq_length=plan.facts.seq_length, local_batch_size=1, activation_checkpointing=True)


def trains_today(plan: Plan) -> bool:
    """Whether the training step runs in this release: on one process."""
    return one_process_fit(plan) is not None


def runs_today(plan: Plan, step: PlannedStep) -> bool:
    """Steps before training always run; training and the steps after it need training to run today."""
    if trains_today(plan):
        return True
    roles = [s.role for s in plan.chain.steps]
    return "train" in roles and roles.index(step.role) < roles.index("train")


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
    today = one_process_fit(plan)
    if today is not None:  # what runs now: one process, sized for one GPU of the layout
        fit, layout = today, one_process_layout(plan)
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
    if fit.lora and fit.strategy == "fsdp2":
        settings["distributed.strategy"] = "fsdp2"
    if layout.nodes > 1:
        settings["run.env.nodes"] = layout.nodes
    if layout.gpus > 1:
        settings["run.env.nprocs_per_node"] = layout.gpus
    if paths["val"]:
        settings["validation_dataset.path_or_dataset_id"] = paths["val"]
    if decision.lora and step.id == "sft/automodel":
        settings["peft"] = "lora"
        settings["optimizer.lr"] = LORA_LR
    return settings


def _default_config(step_id: str) -> tuple[Path, dict[str, Any]]:
    from chatft.config.loader import load_with_defaults

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
    if runs_today(plan, step):
        header += f"# Run: {command(plan, step, Path('THIS_FILE.yaml'))}\n"
    elif step.role == "train":
        header += (f"# Needs the {plan.facts.layout.world} processes of the plan: training on several processes is "
                   "not in this release\n# (chatft run refuses it with error[not_available_yet]); see plan.md.\n")
    else:
        header += "# Runs after the training step, which needs training on several processes; see plan.md.\n"
    document = {"defaults": str(default_path), **body}
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=True)


def config_path(plan: Plan, index: int, step: PlannedStep) -> Path:
    name = CONFIG_NAMES.get(step.role) or step.id.split("/")[0]
    return plan.out / f"{index}-{name}.yaml"


def command(plan: Plan, step: PlannedStep, path: Path) -> str:
    """One process, as this release trains: the config holds every setting, so no --nproc-per-node."""
    return shlex.join(["chatft", "run", step.id, "-c", str(path)])


def one_gpu_plan_command(plan: Plan) -> str:
    """`chatft plan` again for one GPU of the layout: a plan whose every command runs in this release."""
    request, layout = plan.request, plan.facts.layout
    parts = ["chatft", "plan", "--gpus", str(min(layout.gpus, 1))]
    parts += ["--gpu-memory-gb", f"{layout.memory / GB:g}", "--model", request.model]
    for flag, value in (("--want", request.want), ("--data", request.data), ("--seq-length", request.seq_length),
                        ("--local-batch-size", request.local_batch_size)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def write(plan: Plan) -> list[tuple[PlannedStep, Path]]:
    """Write each step's config and plan.md under the plan dir; check each config compiles."""
    from chatft.config.compile import compile_config

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
    extras = [s for s, on in (("`data_prep/chat_jsonl` first", d.prep),
                              ("`convert/merge_lora` to a standalone model", d.merge),
                              ("`eval/model_eval` before and after", d.eval)) if on]
    settings = f" at seq_length {plan.facts.seq_length}, {fit.settings()}" if fit else ""
    return f"HF-native: {what}{settings}" + (f"; {'; '.join(extras)}" if extras else "")


def memory_lines(plan: Plan) -> list[str]:
    facts, fit = plan.facts, plan.fit
    layout = facts.layout
    local = fit.local_batch_size if fit else facts.local_batch_size
    checkpointing = fit.activation_checkpointing if fit else False
    lora_strategy = fit.strategy if fit is not None and fit.lora else None
    full = estimate(facts.model, layout, lora=False, seq_length=facts.seq_length, local_batch_size=local,
                    activation_checkpointing=checkpointing)
    lora = estimate(facts.model, layout, lora=True, seq_length=facts.seq_length, local_batch_size=local,
                    activation_checkpointing=checkpointing, strategy=lora_strategy)
    where = (f"{layout.gpus} GPU{'s' if layout.gpus != 1 else ''} x {layout.nodes} node{'s' if layout.nodes > 1 else ''}"
             if layout.gpus else "CPU")
    lines = [f"memory per GPU at seq_length {facts.seq_length}, local_batch_size {local} ({layout.dtype}, {where}, "
             f"{layout.memory / GB:,.0f} GB each; LoRA r=16 on every linear layer):"]
    lines += [f"  {full.line()}", f"  {lora.line()}"]
    if fit is not None and fit.lora and facts.full_fit is not None:
        lines.append(f"  full SFT also fits at {facts.full_fit.settings()} ({facts.full_fit.total / GB:,.1f} GB per "
                     "GPU): the next step once the adapter plateaus, with peft=null optimizer.lr=1e-5")
    if layout.world > 1 and fit is not None:
        lines.append(f"  this release trains on one process: {one_process_estimate(plan).line()}")
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
        lines += [("" if markdown else "  ") + command(plan, step, path) for step, path in written
                  if runs_today(plan, step)]
        if markdown:
            lines.append("```")
        lines += [f"{bullet}{line}" for line in one_process_notes(plan, written, code)]
    return "\n".join(lines).rstrip() + "\n"


def one_process_notes(plan: Plan, written: list[tuple[PlannedStep, Path]], code: str) -> list[str]:
    """What a layout of several GPUs or nodes means in this release, which trains on one process."""
    layout = plan.facts.layout
    if layout.world == 1:
        return []
    where = f"{layout.gpus} GPUs" if layout.gpus else "CPU"
    where += f" x {layout.nodes} nodes" if layout.nodes > 1 else ""
    if trains_today(plan):
        idle = (f"this release trains on one process: the training command runs on one GPU ({where} need training "
                "on several processes, DDP/FSDP2, which comes with the scale-out; until then the others stay idle)")
        return [idle]
    waiting = ", ".join(f"{code}{path.name}{code}" for step, path in written if not runs_today(plan, step))
    mode = "LoRA" if plan.decision.lora else "full SFT"
    why = (f"not runnable in this release: {waiting}, because {mode} fits only when spread over the {where} "
           "(training on several processes, which comes with the scale-out; `chatft run` refuses it with "
           f"error[not_available_yet]), not on one GPU: {one_process_estimate(plan).line()}")
    return [why, f"for a run today, plan for one GPU: {code}{one_gpu_plan_command(plan)}{code}"]
