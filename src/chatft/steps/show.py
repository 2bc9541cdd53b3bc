"""Render the registry for people (rich tables) and for scripts (JSON on stdout)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from chatft.steps.registry import Step, filter_steps, resolve_step


def _ports(ports: list[Any]) -> str:
    return "\n".join(dict.fromkeys(p.type + ("" if p.required else "?") for p in ports))


def _json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def list_steps(*, as_json: bool, category: str | None, consumes: str | None, produces: str | None) -> None:
    steps = filter_steps(category=category, consumes=consumes, produces=produces)
    if as_json:
        _json([step.summary() for step in steps])
        return
    table = Table(title=None, show_lines=False)
    table.add_column("id", no_wrap=True)
    table.add_column("consumes", no_wrap=True)
    table.add_column("produces", no_wrap=True)
    table.add_column("what it does", min_width=24)
    for step in steps:
        # The category is the id's first part, so it gets no column of its own.
        table.add_row(step.id, _ports(step.consumes), _ports(step.produces), step.name)
    console = Console()
    console.print(table)
    if not steps:
        console.print("no step matches these filters")


def _format_default(value: Any) -> str:
    return "-" if value is None else json.dumps(value)


def show_step(step_id: str, *, as_json: bool) -> None:
    step: Step = resolve_step(step_id)
    if as_json:
        _json(step.details())
        return
    console = Console(highlight=False)
    console.print(f"[bold]{step.id}[/bold]  {step.name}")
    console.print(step.description)
    console.print(f"tags: {', '.join(step.tags)}")
    console.print(f"configs: {', '.join(step.config_names())}  (chatft run {step.id} -c NAME)")
    for title, ports in (("consumes", step.consumes), ("produces", step.produces)):
        console.print(f"\n[bold]{title}[/bold]")
        for port in ports:
            console.print(f"  {port.type}{'' if port.required else ' (optional)'}: {port.description}")

    table = Table(title="parameters", title_justify="left")
    for column in ("name", "default", "typical", "description"):
        table.add_column(column, overflow="fold")
    for p in step.parameters:
        description = p.description + (f" [choices: {', '.join(map(str, p.choices))}]" if p.choices else "")
        table.add_row(p.name, _format_default(p.default), p.typical or "", description)
    console.print()
    console.print(table)

    console.print("\n[bold]strategies[/bold]")
    for s in step.strategies:
        console.print(f"  when {s.when} -> {s.then}")
    console.print("\n[bold]errors[/bold]")
    for e in step.errors:
        console.print(f"  {e.id}: {e.when}\n    recovery: {e.recovery}")
