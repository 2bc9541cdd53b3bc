"""The `chatft` command: parse arguments, call one function, turn `ChatftError` into the error block.

Kept thin and cheap to import: `chatft --help` and `chatft steps ...` never load torch or transformers.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from chatft import __version__, console
from chatft.errors import EXIT_USER_ERROR, ChatftError

app = typer.Typer(
    name="chatft",
    help="Fine-tune a Hugging Face chat model: full SFT or LoRA, merge the adapter, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
steps_app = typer.Typer(help="The step registry: what each step consumes, produces and lets you tune.",
                        no_args_is_help=True)
app.add_typer(steps_app, name="steps")


def _version(value: bool) -> None:
    if value:
        print(f"chatft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="Only warnings, errors and results: no progress or information lines."),
    log_format: str = typer.Option("text", "--log-format",
                                   help="text | json: json prints one JSON object per line (events: info, warning, "
                                        "result, progress, step, validation; errors on stderr) for scripts."),
) -> None:
    """chatft: the Hugging Face-native way to fine-tune a chat model."""
    if log_format not in console.FORMATS:
        raise ChatftError("config_invalid", f"--log-format {log_format}: not a log format",
                          f"use one of {', '.join(console.FORMATS)}")
    console.configure(log_format, quiet)


# --------------------------------------------------------------------------- steps


@steps_app.command("list")
def steps_list(
    as_json: bool = typer.Option(False, "--json", help="A JSON array instead of a table."),
    category: Optional[str] = typer.Option(None, "--category", help="Only steps of this category."),
    consumes: Optional[str] = typer.Option(None, "--consumes", help="Only steps that accept this artifact type."),
    produces: Optional[str] = typer.Option(None, "--produces", help="Only steps that produce this artifact type."),
) -> None:
    """List the registered steps."""
    from chatft.steps import show  # per command: chatft --help imports none of it

    show.list_steps(as_json=as_json, category=category, consumes=consumes, produces=produces)


@steps_app.command("show")
def steps_show(
    step_id: str = typer.Argument(..., metavar="ID", help="A step id, or its last part when unambiguous."),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of text."),
) -> None:
    """Show one step: consumes, produces, parameters, strategies, errors."""
    from chatft.steps import show  # per command: chatft --help imports none of it

    show.show_step(step_id, as_json=as_json)


# --------------------------------------------------------------------------- run and its shorthands


@app.command(context_settings={"allow_interspersed_args": True})
def run(
    step_id: str = typer.Argument(..., metavar="ID", help="The step to run, e.g. peft/automodel."),
    overrides: Optional[list[str]] = typer.Argument(None, metavar="[KEY.PATH=VALUE]...",
                                                    help="Config overrides, YAML-typed, applied last."),
    config: Optional[str] = typer.Option(None, "-c", "--config",
                                         help="A config name in the step's config dir (default: default) or a path."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the compiled config and write nothing."),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1,
                                                 help="Processes (GPUs) per node for training steps."),
    nnodes: Optional[int] = typer.Option(None, "--nnodes", min=1, help="Machines the training runs on."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", min=0,
                                            help="This machine's index among --nnodes (0 hosts the rendezvous)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", metavar="HOST:PORT",
                                                help="Rendezvous address: a free port on the machine of --node-rank 0."),
    launcher: str = typer.Option("local", "--launcher", help="local (this machine) | slurm (an sbatch script)."),
    nodes: Optional[int] = typer.Option(None, "--nodes", min=1, help="Slurm: nodes to allocate."),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", min=1,
                                                help="Slurm: GPUs per node, one process each."),
    partition: Optional[str] = typer.Option(None, "--partition", help="Slurm: the partition."),
    time_limit: Optional[str] = typer.Option(None, "--time", help="Slurm: the time limit, e.g. 04:00:00."),
    account: Optional[str] = typer.Option(None, "--account", help="Slurm: the account."),
) -> None:
    """Compile a step's config and run it."""
    from chatft import launch, slurm  # per command: chatft --help imports none of it
    from chatft import run as runner
    from chatft.steps.registry import resolve_step

    overrides = list(overrides or [])
    slurm_options = slurm.SlurmOptions(nodes, gpus_per_node, partition, time_limit, account)
    multi_node = [flag for flag, value in (("--nnodes", nnodes), ("--node-rank", node_rank),
                                           ("--rdzv-endpoint", rdzv_endpoint)) if value is not None]
    slurm.check_options(launcher, slurm_options, multi_node,
                        training=launcher != "slurm" or resolve_step(step_id).config_schema == "training")
    if nproc_per_node is not None:
        overrides.append(f"run.env.nprocs_per_node={nproc_per_node}")
    if nnodes is not None:
        overrides.append(f"run.env.nodes={nnodes}")
    overrides += slurm.layout_overrides(slurm_options)
    runner.run(step_id, config, overrides, dry_run=dry_run, argv=sys.argv[1:],
               place=launch.NodePlace(node_rank, rdzv_endpoint),
               slurm_job=slurm_options if launcher == "slurm" else None)


@app.command()
def prep(
    input_path: str = typer.Argument(..., metavar="INPUT", help="JSONL/JSON/Parquet file or a Hub dataset id."),
    output: str = typer.Option(..., "-o", "--output", help="The messages JSONL to write."),
    data_format: str = typer.Option("auto", "--format",
                                    help="auto | messages | sharegpt | alpaca | prompt_completion | hh | xlam | glaive "
                                         "| toolace"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Hold out this fraction for validation."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad row (error[bad_row]) instead of dropping it."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a Hub dataset id, e.g. train or train[:1000]."),
    overrides: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="More data_prep settings."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the compiled config and write nothing."),
) -> None:
    """Convert chat data to `messages` JSONL (shorthand for `run data_prep/chat_jsonl`)."""
    from chatft import run as runner  # per command: chatft --help imports none of it

    settings = [f"input={json.dumps(input_path)}", f"output={json.dumps(output)}", f"format={data_format}"]
    if val_fraction is not None:
        settings.append(f"val_fraction={val_fraction}")
    if strict:
        settings.append("strict=true")
    if split is not None:
        settings.append(f"split={json.dumps(split)}")
    runner.run("data_prep/chat_jsonl", None, settings + list(overrides or []), dry_run=dry_run, argv=sys.argv[1:])


PREVIEW_DEFAULT_STEP = "sft/automodel"


def split_preview_args(args: list[str]) -> tuple[str, list[str]]:
    """`[ID] [KEY.PATH=VALUE]...`: a first argument without `=` is the step id, the rest are overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return PREVIEW_DEFAULT_STEP, args


@app.command()
def preview(
    args: Optional[list[str]] = typer.Argument(
        None, metavar="[ID] [KEY.PATH=VALUE]...",
        help=f"The training step whose config -c names (sft/automodel or peft/automodel; default "
             f"{PREVIEW_DEFAULT_STEP}), then config overrides."),
    config: str = typer.Option(..., "-c", "--config",
                               help="A training config: a path, or a name in the step's config dir (e.g. tiny)."),
    rows: int = typer.Option(3, "--rows", min=1, help="How many rows to show."),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of text."),
) -> None:
    """Tokenize and mask a few rows, with length stats and a memory estimate; no training.

    `chatft preview peft/automodel -c tiny` previews what `chatft run peft/automodel -c tiny` trains."""
    from chatft import preview as previewer  # per command: chatft --help imports none of it
    from chatft.config.compile import compile_config
    from chatft.run import print_warnings
    from chatft.steps.registry import resolve_step

    step_id, overrides = split_preview_args(list(args or []))
    step = resolve_step(step_id)
    if step.config_schema != "training":
        raise ChatftError(
            "config_invalid",
            f"chatft preview shows what a training step trains; {step.id} does not train",
            "preview a training config: `chatft preview sft/automodel -c CONFIG` or "
            "`chatft preview peft/automodel -c CONFIG`",
        )
    compiled = compile_config(step, config, overrides)
    print_warnings(compiled.warnings)
    previewer.preview(compiled.validated, rows=rows, as_json=as_json)


@app.command()
def plan(
    gpus: int = typer.Option(..., "--gpus", min=0, help="GPUs per node (0: plan for CPU)."),
    model: str = typer.Option(..., "--model", help="Hub id or local dir of the model."),
    gpu_memory_gb: Optional[float] = typer.Option(None, "--gpu-memory-gb", help="Memory per GPU (default: 80)."),
    nodes: int = typer.Option(1, "--nodes", min=1),
    want: Optional[str] = typer.Option(None, "--want", help="hf | adapter | megatron (default: hf)"),
    data: Optional[str] = typer.Option(None, "--data", help="The training data to inspect."),
    out: Optional[str] = typer.Option(None, "--out", help="Write plan.md and ready configs here (default: chatft-plan)."),
    seq_length: Optional[int] = typer.Option(None, "--seq-length", min=16,
                                             help="dataset.seq_length (default: from --data lengths, else 2048)."),
    local_batch_size: Optional[int] = typer.Option(None, "--local-batch-size", min=1,
                                                   help="Fix step_scheduler.local_batch_size (default: 4, lowered to fit)."),
) -> None:
    """Route a fine-tuning job to the right chain of steps and write ready configs."""
    from chatft.plan import PlanRequest, run_plan  # per command: chatft --help imports none of it

    run_plan(PlanRequest(gpus=gpus, model=model, gpu_memory_gb=gpu_memory_gb, nodes=nodes, want=want, data=data,
                         out=out, seq_length=seq_length, local_batch_size=local_batch_size))


@app.command()
def report(
    first: str = typer.Argument(
        ..., metavar="DIR",
        help="A training run dir (checkpoint.checkpoint_dir: it holds job.yaml of a training step, metrics.jsonl or "
             "final/chatft_manifest.json) or an eval/model_eval output dir (it holds eval_results.json); each DIR "
             "is told apart by what it holds, in any order, and at least one must be a run."),
    more: Optional[list[str]] = typer.Argument(None, metavar="[DIR]...",
                                               help="More run dirs (to compare) and eval output dirs."),
    out: Optional[str] = typer.Option(
        None, "-o", "--output",
        help="Where to write (default: RUN_DIR/report.html for one run, ./compare.html for several)."),
) -> None:
    """Write a run's report.html (job, data, mask preview, curves, memory, and the eval results given), or, for
    several run dirs, a comparison: curves overlaid, the settings that differ highlighted. One offline file."""
    from chatft.report import report_dirs  # per command: chatft --help imports none of it

    console.result(f"report: {report_dirs([first, *(more or [])], out)}")


def main() -> None:
    try:
        app()
    except ChatftError as err:
        console.error(err)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
