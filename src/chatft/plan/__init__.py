"""`chatft plan`: route a fine-tuning job through the decision table, and write what it takes to run it.

In: a `PlanRequest` (GPUs, memory per GPU, nodes, the model, what output is wanted, the data, an output dir).
Out: a `Plan`: the facts gathered offline (models.py: size and shapes; data.py: format, rows, lengths;
fit.py: memory per GPU), the `Decision` of the rules (rules.py), the chain of steps with typed edges
(chain.py), and for each step a config that inherits the shipped `default.yaml` and sets only the keys that
differ, with the command that runs it (output.py). `run_plan` prints it, writes the configs and `plan.md`, and
raises the refusal when the route away from chatft was demanded of it.

A model chatft cannot load is refused before any rule runs; so is data that cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chatft.errors import ChatftError
from chatft.plan.chain import Chain, build_chain
from chatft.plan.data import DataFacts, choose_seq_length, inspect_data
from chatft.plan.fit import DEFAULT_GPU_GB, DEFAULT_LOCAL_BATCH, GB, Layout, estimate, ladder
from chatft.plan.models import ModelFacts, resolve_model
from chatft.plan.rules import RULES, Decision, Facts, Rule, chosen_fit, decide

__all__ = ["PlanRequest", "Plan", "make_plan", "run_plan", "RULES", "Rule", "Facts", "Decision", "decide"]

WANTS = ("hf", "adapter", "megatron")
DEFAULT_OUT = "chatft-plan"


@dataclass(frozen=True)
class PlanRequest:
    gpus: int
    model: str
    gpu_memory_gb: float | None = None
    nodes: int = 1
    want: str | None = None
    data: str | None = None
    out: str | None = None
    seq_length: int | None = None
    local_batch_size: int | None = None


@dataclass
class Plan:
    request: PlanRequest
    facts: Facts
    decision: Decision
    chain: Chain
    out: Path
    seq_length_why: str
    memory_assumed: str | None  # how the memory per GPU was chosen when --gpu-memory-gb was not given

    @property
    def fit(self):
        return chosen_fit(self.facts, self.decision)


def _check_request(request: PlanRequest) -> None:
    problems = []
    if request.want is not None and request.want not in WANTS:
        problems.append(f"--want {request.want} is not one of {', '.join(WANTS)}")
    if request.gpus < 0 or request.nodes < 1:
        problems.append("--gpus must be >= 0 and --nodes >= 1")
    if request.gpu_memory_gb is not None and request.gpu_memory_gb <= 0:
        problems.append(f"--gpu-memory-gb {request.gpu_memory_gb} must be positive")
    if request.seq_length is not None and request.seq_length < 16:
        problems.append(f"--seq-length {request.seq_length} must be >= 16")
    if request.local_batch_size is not None and request.local_batch_size < 1:
        problems.append(f"--local-batch-size {request.local_batch_size} must be >= 1")
    if problems:
        raise ChatftError("config_invalid", "; ".join(problems),
                          "e.g. chatft plan --gpus 2 --gpu-memory-gb 80 --model ORG/NAME --want hf --data data.jsonl")


def _memory(request: PlanRequest) -> tuple[int, str | None]:
    if request.gpu_memory_gb is not None:
        return int(request.gpu_memory_gb * GB), None
    if request.gpus > 0:
        return int(DEFAULT_GPU_GB * GB), f"no --gpu-memory-gb: assumed {DEFAULT_GPU_GB:.0f} GB per GPU (A100/H100 80GB)"
    import torch

    from chatft.train.memory import free_memory  # torch loads for a CPU plan only, not when plan starts

    free = free_memory(torch.device("cpu")) or 16 * GB
    return free, f"--gpus 0 (CPU) and no --gpu-memory-gb: this machine's free memory, {free / GB:,.1f} GB"


def make_plan(request: PlanRequest) -> Plan:
    """Gather the facts, apply the rules, build the chain. Nothing is written or printed."""
    _check_request(request)
    model: ModelFacts = resolve_model(request.model)
    data: DataFacts = inspect_data(request.data)
    memory, memory_assumed = _memory(request)
    layout = Layout(request.gpus, request.nodes, memory)
    seq_length, why = choose_seq_length(data, model.max_positions, request.seq_length)
    start = request.local_batch_size or DEFAULT_LOCAL_BATCH
    fixed = request.local_batch_size is not None
    facts = Facts(
        want=request.want or "hf", want_given=request.want is not None, layout=layout, model=model, data=data,
        seq_length=seq_length, local_batch_size=start,
        full_start=estimate(model, layout, lora=False, seq_length=seq_length, local_batch_size=start),
        full_fit=ladder(model, layout, lora=False, seq_length=seq_length, local_batch_size=start, batch_fixed=fixed),
        lora_fit=ladder(model, layout, lora=True, seq_length=seq_length, local_batch_size=start, batch_fixed=fixed),
    )
    if facts.lora_fit is None:  # the next rung of the `oom` ladder: LoRA on a 4-bit base
        facts.qlora_fit = ladder(model, layout, lora=True, seq_length=seq_length, local_batch_size=start,
                                 batch_fixed=fixed, quantization="nf4")
    decision = decide(facts)
    data_label = Path(data.path).name if data.path else "data/train.jsonl"
    chain = build_chain(decision, model.given, data_label)
    out = Path(request.out or DEFAULT_OUT).expanduser().resolve()
    return Plan(request, facts, decision, chain, out, why, memory_assumed)


def run_plan(request: PlanRequest) -> Plan:
    """`chatft plan`: print the plan; write its configs and plan.md; raise the refusal if there is one."""
    from chatft.plan import output  # imports this package: a top-level import would be a cycle

    plan = make_plan(request)
    if plan.decision.refusal is not None:
        print(output.render(plan, written=None, markdown=False))
        raise plan.decision.refusal
    written = output.write(plan)
    print(output.render(plan, written=written, markdown=False))
    return plan
