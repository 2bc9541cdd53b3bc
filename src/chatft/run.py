"""`chatft run`: compile a step's config, record the job, hand it to the step's implementation.

In: a step id, `-c`, overrides. Out: with `--dry-run`, the compiled config on stdout and nothing
written; otherwise `job.yaml` in the run's output dir, written before the step starts, then the step.
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.metadata
import os
import platform
import shlex
import socket
from pathlib import Path
from typing import Any


from chatft import console, launch, slurm
from chatft.artifacts import package_versions
from chatft.config.compile import CompiledConfig, compile_config, get_path
from chatft.config.loader import to_yaml
from chatft.config.secrets import redact, redact_overrides
from chatft.errors import ChatftError
from chatft.output_paths import refuse_file_in_the_way
from chatft.run_layout import JOB_FILE
from chatft.steps.registry import resolve_step
from chatft.data.guards import check_model_location


def host_record(with_device: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    if not with_device:  # data prep never touches an accelerator: spare it the torch import
        return record
    import torch  # model steps load torch anyway; the record says which device they will see

    record["cuda_available"] = torch.cuda.is_available()
    if record["cuda_available"]:
        record["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        record["cuda_version"] = torch.version.cuda
    return record


def _call(entry_point: str, compiled: CompiledConfig) -> None:
    module_name, _, function_name = entry_point.partition(":")
    getattr(importlib.import_module(module_name), function_name)(compiled)


def job_record(compiled: CompiledConfig, argv: list[str]) -> dict[str, Any]:
    return {
        "step": compiled.step.id,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": redact_overrides(argv),
        "cwd": os.getcwd(),  # where the run's relative paths start: the report's mask preview reads its data there
        "config_files": [str(p) for p in compiled.files],
        "overrides": redact_overrides(compiled.overrides),
        "warnings": compiled.warnings,
        "versions": package_versions(),
        "host": host_record(with_device=compiled.step.config_schema != "data_prep"),
        "raw": redact(compiled.raw),
        "resolved": redact(compiled.effective()),
    }


def make_output_dir(directory: Path, key: str, value: str) -> None:
    """`mkdir -p` with its failures as refusals naming the config key."""
    refuse_file_in_the_way(directory, key, value)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # permissions, a read-only file system, ...
        raise ChatftError("config_invalid", f"{key}={value}: cannot create {directory} ({exc.strerror})",
                          f"choose another {key}, or fix the permissions of its parent folder") from None


def check_training_model(compiled: CompiledConfig) -> None:
    """A training model that cannot load (a missing path, an uncached Hub id offline) is refused here, before
    job.yaml is written into a run that cannot start, and before the seconds of importing torch."""
    if compiled.step.config_schema != "training":
        return
    check_model_location("model.pretrained_model_name_or_path", compiled.validated.model.pretrained_model_name_or_path)


def write_job(compiled: CompiledConfig, argv: list[str]) -> Path:
    directory = compiled.output_dir()
    make_output_dir(directory, compiled.step.output_key, str(get_path(compiled.effective(), compiled.step.output_key)))
    path = directory / JOB_FILE
    path.write_text(to_yaml(job_record(compiled, argv)))
    return path


def print_warnings(warnings: list[str]) -> None:
    for line in warnings:
        console.warning(line)


def dry_run_text(compiled: CompiledConfig) -> str:
    header = [f"# step: {compiled.step.id}", f"# from: {', '.join(str(p) for p in compiled.files)}"]
    if compiled.overrides:
        header.append(f"# overrides: {' '.join(redact_overrides(compiled.overrides))}")
    if compiled.step.config_schema == "training":
        cfg = compiled.validated
        header.append(
            f"# gradient accumulation: {cfg.grad_accumulation_steps()} micro-batches of "
            f"{cfg.step_scheduler.local_batch_size} x data-parallel {cfg.data_parallel_size()} "
            f"= global batch {cfg.step_scheduler.global_batch_size}"
        )
        header.append(f"# mode: {'LoRA adapter' if cfg.peft is not None else 'full SFT'}")
    return "\n".join(header) + "\n" + to_yaml(redact(compiled.effective()))


def run(step_id: str, config: str | None, overrides: list[str], *, dry_run: bool, argv: list[str],
        place: launch.NodePlace = launch.NodePlace(), slurm_job: slurm.SlurmOptions | None = None) -> None:
    """Run a step here; `slurm_job`: write (and submit) an sbatch script that runs it on a Slurm allocation."""
    step = resolve_step(step_id)
    # One of several training processes (torchrun's environment): a config naming no layout takes torchrun's.
    joined = launch.joined_env() if step.config_schema == "training" else None
    compiled = compile_config(step, config, overrides)
    if joined is not None and compiled.validated.data_parallel_size() == 1 and joined.world_size > 1:
        compiled = compile_config(step, config, [*launch.layout_overrides(joined), *overrides])
    # Warnings once per console, job.yaml once per run: a launcher wrote them for the processes it starts, and
    # on several machines the one with node rank 0 writes job.yaml.
    speaks = joined is None or (joined.rank == 0 and not launch.launched_by_chatft())
    if speaks:
        print_warnings(compiled.warnings)
    if slurm_job is not None:
        _submit_to_slurm(compiled, slurm_job, dry_run=dry_run, argv=argv)
        return
    if dry_run:
        print(dry_run_text(compiled), end="")
    if compiled.refusal is not None:  # after the dry run's config, before anything is written or loaded
        raise compiled.refusal
    if dry_run:
        return
    processes_here = 1
    if joined is not None:
        launch.check_layout(compiled.validated.data_parallel_size(), joined.world_size)
    elif step.config_schema == "training":
        processes_here = launch.node_layout(compiled.validated.data_parallel_size(), compiled.validated.run.env.nodes,
                                            place)
    if step.preflight:
        _call(step.preflight, compiled)
    check_training_model(compiled)
    if speaks and place.node_rank in (None, 0):
        write_job(compiled, argv)
    if joined is None and step.config_schema == "training" and compiled.validated.data_parallel_size() > 1:
        raise SystemExit(launch.launch_training(compiled.output_dir(), processes_here, argv,
                                                compiled.validated.run.env.nodes, place))
    _call(step.entry_point, compiled)


def _submit_to_slurm(compiled: CompiledConfig, options: slurm.SlurmOptions, *, dry_run: bool, argv: list[str]) -> None:
    """--launcher slurm: the sbatch script for the compiled run; printed on a dry run, else written and submitted."""
    if compiled.refusal is not None:
        raise compiled.refusal
    cfg = compiled.validated
    nodes = cfg.run.env.nodes
    script = slurm.sbatch_script(compiled.step.id, compiled.output_dir(), nodes,
                                 launch.processes_per_node(cfg.data_parallel_size(), nodes), options,
                                 shlex.join(["chatft", *redact_overrides(argv)]), Path.cwd())
    if dry_run:
        print(script, end="")
        return
    check_training_model(compiled)
    write_job(compiled, argv)
    slurm.write_and_submit(compiled.output_dir(), script, to_yaml(compiled.effective()))
