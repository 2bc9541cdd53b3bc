"""The routing table as data, and the one function that applies it.

In: `Facts` (the request, the model, the data, the memory estimates). Out: a `Decision`: the route (chatft's
HF-native steps or Megatron-Bridge outside chatft), the training step and whether it trains LoRA, which steps
bracket it, and every rule that fired with the concrete fact that triggered it.

Each `Rule` is one row of the table: the user constraint and the decision, in the table's words, a `when`
that returns the triggering fact (or None), and the `effect` it has on the decision. `decide` walks the rules
in order; a rule's `when` may read what earlier rules decided (the merge rule needs to know LoRA was chosen).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from chatft.errors import ChatftError
from chatft.plan.data import SMALL_DATA_ROWS, DataFacts
from chatft.plan.fit import GB, GpuEstimate, Layout
from chatft.plan.models import ModelFacts

SMALL_MODEL_PARAMS = 10e9
FEW_GPUS = 4


@dataclass
class Facts:
    want: str  # hf | adapter | megatron (hf when not given)
    want_given: bool
    layout: Layout
    model: ModelFacts
    data: DataFacts
    seq_length: int
    local_batch_size: int  # where the ladder starts
    full_start: GpuEstimate  # full SFT at the starting settings
    full_fit: GpuEstimate | None  # the first rung of the ladder that fits, if any
    lora_fit: GpuEstimate | None
    qlora_fit: GpuEstimate | None = None  # LoRA on a 4-bit NF4 base; looked for only when LoRA fits nowhere


@dataclass
class Decision:
    route: str = "hf"  # hf | megatron
    train_step: str = "sft/automodel"
    lora: bool = False
    quantization: str | None = None  # QLoRA: the base's 4-bit type
    prep: bool = False
    merge: bool = False
    eval: bool = False
    refusal: ChatftError | None = None  # the route away was demanded from chatft
    fired: list[tuple[Rule, str]] = field(default_factory=list)

    @property
    def in_chatft(self) -> bool:
        return self.route == "hf"


@dataclass(frozen=True)
class Rule:
    id: str
    constraint: str  # the user constraint, as the table words it
    decision: str  # the decision, as the table words it
    when: Callable[[Facts, Decision], str | None]  # the fact that triggers it, or None
    effect: str  # hf | megatron | adapter | lora | prep | merge | eval
    refuse: Callable[[Facts], ChatftError] | None = None  # for routes away the user demanded of chatft


# --------------------------------------------------------------------------- triggers


def _hf_output(f: Facts, d: Decision) -> str | None:
    if f.want != "hf":
        return None
    return "--want hf" if f.want_given else "no --want: a fine-tuned Hugging Face model is the default output"


def _few_gpus_or_small(f: Facts, d: Decision) -> str | None:
    found = []
    if f.layout.world <= FEW_GPUS:
        found.append(f"{f.layout.world} GPU{'s' if f.layout.world != 1 else ''} in all" if f.layout.gpus
                     else "CPU only (--gpus 0)")
    if f.model.params <= SMALL_MODEL_PARAMS:
        found.append(f"{f.model.billions:,.2f}B parameters (<= {SMALL_MODEL_PARAMS / 1e9:.0f}B)")
    return "; ".join(found) or None


def _hf_model(f: Facts, d: Decision) -> str | None:
    if f.model.nemotron:
        return None
    kind = "a custom-code" if f.model.custom_code else f"a {f.model.model_type}"
    also = (" (Megatron-Bridge also has recipes for this family: the alternative only when a Megatron-Bridge row "
            "below applies)" if f.model.bridge_recipe else "")
    return f"{f.model.given} is {kind} Hugging Face model, not a Nemotron{also}"


def _megatron_output(f: Facts, d: Decision) -> str | None:
    return "--want megatron" if f.want == "megatron" else None


def _nemotron_parity(f: Facts, d: Decision) -> str | None:
    if f.layout.nodes > 1 and f.model.nemotron3 and not (f.want_given and f.want != "megatron"):
        return (f"--nodes {f.layout.nodes} with {f.model.given}, a Nemotron 3 Nano/Super: parity with NVIDIA's "
                "recipes means Megatron-Bridge's (an explicit --want hf or --want adapter keeps it in chatft)")
    return None


def _megatron_input(f: Facts, d: Decision) -> str | None:
    return f.data.megatron_input.message if f.data.megatron_input is not None else None


def _parallelism(f: Facts, d: Decision) -> str | None:
    if f.full_fit is not None or f.lora_fit is not None or f.qlora_fit is not None:
        return None
    return (f"nothing fits in {f.layout.memory / GB:,.0f} GB per GPU at seq_length {f.seq_length}, even LoRA with "
            f"local_batch_size 1, FSDP2 and activation checkpointing, or on a 4-bit base: the model must be split "
            f"across GPUs "
            f"(tensor/pipeline{'/expert' if f.model.moe else ''} parallelism)")


def _adapter_only(f: Facts, d: Decision) -> str | None:
    return "--want adapter" if d.in_chatft and f.want == "adapter" else None


def _lora_first(f: Facts, d: Decision) -> str | None:
    if not d.in_chatft:
        return None
    found = []
    if f.data.rows_clean is not None and f.data.rows_clean < SMALL_DATA_ROWS:
        found.append(f"{f.data.rows_clean:,} clean rows (under ~{SMALL_DATA_ROWS // 1000}k)")
    if not f.full_start.fits:
        found.append(f"tight memory: full SFT needs {f.full_start.total / GB:,.1f} GB per GPU at "
                     f"{f.full_start.settings()}, over {f.layout.memory / GB:,.0f} GB")
    if f.layout.gpus and f.layout.world <= 2:
        found.append(f"{f.layout.world} GPU{'s' if f.layout.world > 1 else ''}")
    return "; ".join(found) or None


def _qlora(f: Facts, d: Decision) -> str | None:
    if not (d.in_chatft and d.lora) or f.lora_fit is not None or f.qlora_fit is None:
        return None
    return (f"LoRA fits no rung of the ladder in {f.layout.memory / GB:,.0f} GB per GPU; on a 4-bit NF4 base it "
            f"needs {f.qlora_fit.total / GB:,.1f} GB ({f.qlora_fit.settings()})")


def _not_messages(f: Facts, d: Decision) -> str | None:
    if not d.in_chatft or not f.data.needs_prep:
        return None
    if f.data.kind == "hub":
        return f"--data {f.data.path} is a Hub dataset id whose format chatft plan cannot read offline"
    return f"--data {f.data.path} is in {f.data.format} format"


def _standalone(f: Facts, d: Decision) -> str | None:
    if d.in_chatft and d.lora and f.want == "hf":
        return "LoRA trains an adapter, and a standalone Hugging Face model is the output wanted"
    return None


def _quality(f: Facts, d: Decision) -> str | None:
    if not d.in_chatft:
        return None
    return f"{d.train_step}{' (LoRA)' if d.lora and d.train_step == 'sft/automodel' else ''} changes the model's answers"


def _refuse_megatron_output(f: Facts) -> ChatftError:
    return ChatftError(
        "route_not_supported",
        "--want megatron: a (large, distributed) Megatron checkpoint is Megatron-Bridge's output; chatft trains "
        "Hugging Face models and writes save_pretrained dirs and PEFT adapters",
        "fine-tune with Megatron-Bridge for a Megatron checkpoint; for a chatft run, plan again with --want hf "
        "(a standalone model) or --want adapter (a LoRA adapter)",
    )


def _refuse_megatron_input(f: Facts) -> ChatftError:
    assert f.data.megatron_input is not None
    return f.data.megatron_input


RULES: tuple[Rule, ...] = (
    Rule("hf_output", "an HF checkpoint is the required output",
         "HF-native path (`sft/automodel` or `peft/automodel`)", _hf_output, "hf"),
    Rule("few_gpus_or_small_model", "1-4 GPUs, or a smaller model", "HF-native path", _few_gpus_or_small, "hf"),
    Rule("hf_model", "a non-Nemotron or custom HF model",
         "HF-native path, unless a Megatron-Bridge recipe exists for it", _hf_model, "hf"),
    Rule("megatron_output", "large distributed Megatron checkpoint output",
         "Megatron-Bridge (outside chatft); route_not_supported when demanded of chatft", _megatron_output,
         "megatron", refuse=_refuse_megatron_output),
    Rule("nemotron_parity", "multi-node Nemotron Nano3/Super3 parity", "Megatron-Bridge (outside chatft)",
         _nemotron_parity, "megatron"),
    Rule("megatron_input", "packed Parquet or bin/idx input", "Megatron-Bridge (outside chatft); chatft refuses the data",
         _megatron_input, "megatron", refuse=_refuse_megatron_input),
    Rule("model_parallelism", "TP/PP/EP needed", "Megatron-Bridge (outside chatft)", _parallelism, "megatron"),
    Rule("adapter_only", "adapter-only tuning on HF data", "`peft/automodel`", _adapter_only, "adapter"),
    Rule("lora_first", "small data (under ~10k clean rows), tight memory, or 1-2 GPUs",
         "LoRA before full SFT (`peft=lora` or `peft/automodel`)", _lora_first, "lora"),
    Rule("qlora", "LoRA does not fit in memory, LoRA on a 4-bit base does",
         "QLoRA: LoRA on the base loaded in 4-bit NF4 (`model.quantization=nf4`, needs `chatft[qlora]`)", _qlora,
         "qlora"),
    Rule("prep_first", "data not in OpenAI `messages`", "add `data_prep/chat_jsonl` first", _not_messages, "prep"),
    Rule("merge_adapter", "an adapter must become a standalone model", "add `convert/merge_lora`", _standalone,
         "merge"),
    Rule("eval_bookend", "quality changes",
         "bookend with `eval/model_eval` (baseline and after, identical settings)", _quality, "eval"),
)


def decide(facts: Facts) -> Decision:
    """Apply every rule in table order; each one that fires is recorded with its trigger and applied."""
    decision = Decision()
    for rule in RULES:
        trigger = rule.when(facts, decision)
        if trigger is None:
            continue
        decision.fired.append((rule, trigger))
        if rule.effect == "megatron":
            decision.route = "megatron"
            if rule.refuse is not None and decision.refusal is None:
                decision.refusal = rule.refuse(facts)
        elif rule.effect == "adapter":
            decision.train_step, decision.lora = "peft/automodel", True
        elif rule.effect == "lora":
            decision.lora = True
        elif rule.effect == "qlora":
            decision.quantization = "nf4"
        elif rule.effect == "prep":
            decision.prep = True
        elif rule.effect == "merge":
            decision.merge = True
        elif rule.effect == "eval":
            decision.eval = True
    # No fix-ups needed after the walk: full SFT not fitting fires `lora_first`, and LoRA (whose FSDP2 rung
    # shards as much as full SFT does) fits whenever full SFT fits, so the chosen mode always has a fit.
    return decision


def chosen_fit(facts: Facts, decision: Decision) -> GpuEstimate | None:
    if decision.quantization:
        return facts.qlora_fit
    return facts.lora_fit if decision.lora else facts.full_fit
