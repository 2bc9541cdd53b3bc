"""`chatft run ... --launcher slurm`: the sbatch script a dry run prints is valid bash and asks for the allocation
given; a real run writes it with the resolved config and submits it with `sbatch`; and the script, run with
stand-ins for `srun` and `scontrol` that start its node tasks on this machine, trains what one process trains."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
from pathlib import Path

import yaml
from clirun import CHATFT, assert_error_block, run_chatft
from test_distributed_cli import ROWS, assert_same_training, command, train

STUB_SRUN = """#!/bin/bash
# srun's stand-in: one task per node of the allocation, each with its SLURM_NODEID, on this machine.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
STUB_SCONTROL = "#!/bin/bash\necho localhost\n"
STUB_SBATCH = '#!/bin/bash\necho "$@" > "$(dirname "$0")/sbatch.args"\necho "Submitted batch job 4242"\n'


def stub(directory: Path, name: str, text: str) -> None:
    path = directory / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def slurm_command(model: Path, run: str, *flags: str) -> list[str]:
    return [*command(model, "lora", run, 1), "--launcher", "slurm", *flags]


def test_a_dry_run_prints_a_valid_script_for_the_allocation_and_writes_nothing(tmp_path, tiny_model_dir):
    result = run_chatft(*slurm_command(tiny_model_dir, "planned", "--nodes", "2", "--gpus-per-node", "4",
                                       "--partition", "gpu", "--time", "04:00:00", "--account", "lab",
                                       "step_scheduler.global_batch_size=16"),
                        "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00", "#SBATCH --account=lab"):
        assert line in script.splitlines(), script
    assert '--nproc-per-node 4 --nnodes 2 --node-rank "$SLURM_NODEID"' in script
    assert str(tmp_path / "planned" / "sbatch_config.yaml") in script
    checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert not (tmp_path / "planned").exists()


def test_flags_that_do_not_go_together_are_refused(tmp_path, tiny_model_dir):
    alone = run_chatft(*command(tiny_model_dir, "lora", "x", 1), "--nodes", "2", cwd=tmp_path)
    assert "Slurm options without --launcher slurm" in assert_error_block(alone, "config_invalid")
    mixed = run_chatft(*slurm_command(tiny_model_dir, "x", "--nodes", "2", "--node-rank", "1"), cwd=tmp_path)
    assert "sets the nodes' ranks and rendezvous itself" in assert_error_block(mixed, "config_invalid")
    not_training = run_chatft("run", "eval/model_eval", "--launcher", "slurm", "--dry-run", cwd=tmp_path)
    assert "runs training steps" in assert_error_block(not_training, "config_invalid")


def _free_job_id() -> int:
    """A job id whose rendezvous port (20000 + id % 20000) is free here."""
    while True:
        job_id = random.randrange(20000, 40000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", 20000 + job_id % 20000))
                return job_id
            except OSError:
                continue


def test_the_submitted_script_trains_on_two_nodes_what_one_process_trains(tmp_path, tiny_model_dir):
    work = tmp_path
    (work / "bin").mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("sbatch", STUB_SBATCH)):
        stub(work / "bin", name, text)
    (work / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    train(work, tiny_model_dir, "lora", "alone", 1)
    env = {**os.environ, "PATH": f"{work / 'bin'}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    submitted = subprocess.run([CHATFT, *slurm_command(tiny_model_dir, "cluster", "--nodes", "2",
                                                       "--gpus-per-node", "1")],
                               cwd=work, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    script = work / "cluster" / "sbatch.sh"
    assert "Submitted batch job 4242" in submitted.stdout
    assert (work / "bin" / "sbatch.args").read_text().split() == [str(script.resolve())]
    resolved = yaml.safe_load((work / "cluster" / "sbatch_config.yaml").read_text())
    assert resolved["run"]["env"] == {"nodes": 2, "gpus_per_node": None, "nprocs_per_node": 1}

    job = {**env, "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2", "SLURM_JOB_ID": str(_free_job_id())}
    ran = subprocess.run(["bash", str(script)], cwd="/", env=job, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert_same_training(work / "alone", work / "cluster")
    manifest = json.loads((work / "cluster" / "final" / "chatft_manifest.json").read_text())
    assert manifest["metrics"]["nodes"] == 2 and manifest["metrics"]["world_size"] == 2
