"""The chain of steps a decision makes, its typed edges, and the Mermaid flowchart.

In: a `Decision`. Out: `Chain`: the steps in the order to run them (each a `PlannedStep` with a node key and a
role) and the edges between them (and from the two inputs, the data and the base model), each carrying an
artifact type. Every edge is checked against the registry when it is made: its type must be one the source
produces (or the input's own type) and one the target consumes (`is_a` included). A chain that fails the
check is a bug in the planner, raised as `ValueError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatft.plan.rules import Decision
from chatft.steps.registry import all_steps, is_a


@dataclass(frozen=True)
class Node:
    key: str  # the Mermaid node id
    label: str  # a step id, or the input's description
    step: str | None = None  # the step id; None for an input
    type: str | None = None  # an input's artifact type
    note: str = ""  # shown in the terminal chain, not in Mermaid labels (those are exact step ids)

    def text(self) -> str:
        return f"{self.label} ({self.note})" if self.note else self.label


@dataclass(frozen=True)
class Edge:
    source: Node
    target: Node
    type: str

    def mermaid(self) -> str:
        return f"{_node(self.source)} -->|{self.type}| {_node(self.target)}"

    def text(self) -> str:
        return f"{self.source.text()} --{self.type}--> {self.target.text()}"


@dataclass(frozen=True)
class PlannedStep:
    node: Node
    role: str  # prep | eval_before | train | merge | eval_after

    @property
    def id(self) -> str:
        assert self.node.step is not None
        return self.node.step


@dataclass
class Chain:
    steps: list[PlannedStep] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)

    def connect(self, source: Node, target: Node, type_name: str) -> None:
        check_edge(source, target, type_name)
        self.edges.append(Edge(source, target, type_name))

    def mermaid(self) -> str:
        return "\n".join(["flowchart LR", *(f"    {e.mermaid()}" for e in self.edges)])


def _node(node: Node) -> str:
    if node.step is not None:
        return f"{node.key}[{node.label}]"
    return f'{node.key}[("{node.label}")]'  # inputs drawn as stores, so steps stand out


def check_edge(source: Node, target: Node, type_name: str) -> None:
    """Raise ValueError unless `source` yields `type_name` and `target` accepts it."""
    steps = all_steps()
    produced = [source.type] if source.step is None else [p.type for p in steps[source.step].produces]
    if type_name not in produced:
        raise ValueError(f"{source.label} does not produce {type_name} (it produces {produced})")
    if target.step is None:
        raise ValueError(f"edge into the input {target.label}")
    accepted = [p.type for p in steps[target.step].consumes]
    if not any(is_a(type_name, t) for t in accepted):
        raise ValueError(f"{target.step} does not consume {type_name} (it consumes {accepted})")


def build_chain(decision: Decision, model_label: str, data_label: str) -> Chain:
    """prep? -> eval (baseline) -> train -> merge? -> eval (after), with the inputs wired in."""
    chain = Chain()
    if not decision.in_chatft:
        return chain
    model = Node("M", model_label, type="checkpoint_hf")
    data = Node("D", data_label, type="chat_data" if decision.prep else "training_jsonl")

    def add(key: str, step_id: str, role: str, note: str = "") -> Node:
        node = Node(key, step_id, step=step_id, note=note)
        chain.steps.append(PlannedStep(node, role))
        return node

    rows = data
    if decision.prep:
        prep = add("P", "data_prep/chat_jsonl", "prep")
        chain.connect(data, prep, "chat_data")
        rows = prep
    if decision.eval:
        before = add("E0", "eval/model_eval", "eval_before", "baseline")
        chain.connect(model, before, "checkpoint_hf")
        chain.connect(rows, before, "training_jsonl")
    train = add("T", decision.train_step, "train",
                "peft=lora" if decision.lora and decision.train_step == "sft/automodel" else "")
    chain.connect(model, train, "checkpoint_hf")
    chain.connect(rows, train, "training_jsonl")
    result, result_type = train, "checkpoint_lora" if decision.lora else "checkpoint_hf"
    if decision.merge:
        merge = add("G", "convert/merge_lora", "merge")
        chain.connect(train, merge, "checkpoint_lora")
        result, result_type = merge, "checkpoint_hf"
    if decision.eval:
        after = add("E1", "eval/model_eval", "eval_after", "after")
        chain.connect(model, after, "checkpoint_hf")
        chain.connect(rows, after, "training_jsonl")
        if decision.merge:  # the adapter too: adapter and merged should score the same
            chain.connect(train, after, "checkpoint_lora")
        chain.connect(result, after, result_type)
    return chain
