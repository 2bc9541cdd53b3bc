"""A training run on a Slurm cluster: `chatft run ... --launcher slurm --nodes K --gpus-per-node G`.

In: the compiled training config (its layout already set to K nodes x G processes), the run dir, the Slurm
options. Out: in the run dir, `sbatch.sh` and `sbatch_config.yaml` (the resolved config the job runs, so the job
is what was compiled even if the YAML it came from changes before the job starts), submitted with `sbatch` when it
is on PATH. With `--dry-run` the script is printed and nothing is written.

What the script does: one Slurm task per node (`srun --ntasks-per-node=1`); each starts chatft's launcher,
torchrun's engine, on its node (`--nproc-per-node G --nnodes K --node-rank $SLURM_NODEID`), all meeting at a c10d
rendezvous on the first node of the allocation, on a port derived from the job id. Slurm writes each node's output
to `logs/slurm-JOBID-node-N.out`; chatft's own logs (`logs/rank_N.log`, `logs/launcher_node_K.log`) are written as
in any multi-process run. Torch-free, like the rest of the CLI's decisions.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from chatft.errors import ChatftError
from chatft.run_layout import SLURM_CONFIG, SLURM_SCRIPT, logs_dir

# The rendezvous port: one per job id, so two jobs sharing a first node do not meet each other.
PORT_BASE, PORT_SPAN = 20000, 20000


@dataclass(frozen=True)
class SlurmOptions:
    """The flags of `--launcher slurm` (`None`: not given)."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None

    def given(self) -> list[str]:
        return [f"--{name.replace('_', '-')}" for name, value in vars(self).items() if value is not None]


def check_options(launcher: str, options: SlurmOptions, multi_node_flags: list[str], training: bool) -> None:
    """Refuse flags that do not go together, before anything is compiled or written."""
    if launcher not in ("local", "slurm"):
        raise ChatftError("config_invalid", f"--launcher {launcher!r} is not a launcher chatft knows",
                          "--launcher local (the default: this machine) or --launcher slurm (an sbatch script)")
    if launcher == "local" and options.given():
        raise ChatftError("config_invalid", f"{', '.join(options.given())}: Slurm options without --launcher slurm",
                          "add --launcher slurm, or use --nproc-per-node N on this machine")
    if launcher == "slurm":
        if not training:
            raise ChatftError("config_invalid", "--launcher slurm runs training steps (sft/automodel, "
                              "peft/automodel)", "run this step directly, without --launcher")
        if multi_node_flags:
            raise ChatftError("config_invalid", f"{', '.join(multi_node_flags)}: the Slurm script sets the nodes' "
                              "ranks and rendezvous itself", "drop them; use --nodes K --gpus-per-node G")


def layout_overrides(options: SlurmOptions) -> list[str]:
    """The config overrides that give the run the allocation's layout."""
    overrides = []
    if options.nodes is not None:
        overrides.append(f"run.env.nodes={options.nodes}")
    if options.gpus_per_node is not None:
        overrides.append(f"run.env.nprocs_per_node={options.gpus_per_node}")
    return overrides


def sbatch_script(step_id: str, run_dir: Path, nodes: int, processes_per_node: int, options: SlurmOptions,
                  command_line: str, workdir: Path, python: str = sys.executable) -> str:
    """The sbatch script for this run (paths absolute: the job starts elsewhere, later)."""
    run_dir, workdir = run_dir.resolve(), workdir.resolve()
    config, logs = run_dir / SLURM_CONFIG, logs_dir(run_dir)
    directives = [f"--job-name=chatft-{run_dir.name}", f"--nodes={nodes}", "--ntasks-per-node=1",
                  f"--gpus-per-node={processes_per_node}", f"--output={logs}/slurm-%j.out"]
    directives += [f"--{name}={value}" for name, value in (("partition", options.partition),
                                                           ("time", options.time), ("account", options.account))
                   if value is not None]
    node_command = " ".join([
        shlex.quote(python), "-m", "chatft", "run", shlex.quote(step_id), "-c", shlex.quote(str(config)),
        "--nproc-per-node", str(processes_per_node),
        *([f"--nnodes {nodes}", '--node-rank "$SLURM_NODEID"', '--rdzv-endpoint "$CHATFT_RDZV"'] if nodes > 1 else [])])
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "",
             f"# Written by: {command_line}",
             f"# The job trains the resolved config {config}: one task per node, each starting",
             "# chatft's launcher (torchrun's engine) with one process per GPU; the nodes meet on the first one.",
             "set -euo pipefail",
             f"cd {shlex.quote(str(workdir))}",
             'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             f'export CHATFT_RDZV="$head_node:$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))"',
             f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output={shlex.quote(str(logs))}/slurm-%j-node-%n.out \\",
             f"    bash -c {shlex.quote(node_command)}", ""]
    return "\n".join(lines)


def write_and_submit(run_dir: Path, script: str, resolved_yaml: str) -> int:
    """Write the script and its config into the run dir and submit it where `sbatch` exists; the exit status."""
    run_dir.mkdir(parents=True, exist_ok=True)
    logs_dir(run_dir).mkdir(exist_ok=True)
    (run_dir / SLURM_CONFIG).write_text(resolved_yaml, encoding="utf-8")
    path = (run_dir / SLURM_SCRIPT).resolve()
    path.write_text(script, encoding="utf-8")
    path.chmod(0o755)
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        print(f"wrote {path} (sbatch is not on PATH here): submit it on the cluster with `sbatch {path}`")
        return 0
    submitted = subprocess.run([sbatch, str(path)], capture_output=True, text=True, check=False)
    if submitted.returncode:
        raise ChatftError("config_invalid", f"sbatch refused {path}: {(submitted.stderr or submitted.stdout).strip()}",
                          "fix the Slurm options (--partition, --time, --account) or the script, then "
                          f"`sbatch {path}`")
    print(f"wrote {path}; {submitted.stdout.strip()}; logs in {logs_dir(run_dir)}/")
    return 0
