"""The names inside a training run's directory (`checkpoint.checkpoint_dir`), in one torch-free module that the
CLI, training, eval, merge and the bench all import, so no module spells them again.

    job.yaml            JOB_FILE: raw and resolved config, argv, versions, host (written first)
    metrics.jsonl       METRICS_FILE: one row per optimizer step
    validation.jsonl    VALIDATION_FILE: one row per validation
    loss.png            PLOT_FILE
    tensorboard/        TENSORBOARD_DIR (logging.tensorboard=true)
    checkpoints/        CHECKPOINTS: step_N/ and LATEST (their insides: `train.checkpoints`)
    final/              FINAL: the artifact, with chatft_manifest.json
    report.html         REPORT_FILE: the run report (`chatft.report`), written at the end and by `chatft report`
    trackers.json       TRACKERS_FILE: the W&B and MLflow run ids a resumed run continues (`trackers.continuation`)
    sbatch.sh           SLURM_SCRIPT (--launcher slurm), with SLURM_CONFIG sbatch_config.yaml: the config it runs
    logs/               LOGS_DIR (several processes): rank_N.log per process,
                        launcher_node_K.log (torchrun's agent on node K)
"""

from __future__ import annotations

from pathlib import Path

JOB_FILE = "job.yaml"
METRICS_FILE = "metrics.jsonl"
VALIDATION_FILE = "validation.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS = "checkpoints"
FINAL = "final"
REPORT_FILE = "report.html"
TRACKERS_FILE = "trackers.json"
LOGS_DIR = "logs"
SLURM_SCRIPT = "sbatch.sh"
SLURM_CONFIG = "sbatch_config.yaml"

# What a run writes besides job.yaml: cleared when `checkpoint.overwrite=true` starts a run over.
RUN_OUTPUTS = (FINAL, CHECKPOINTS, METRICS_FILE, VALIDATION_FILE, PLOT_FILE, TENSORBOARD_DIR, REPORT_FILE,
               TRACKERS_FILE)


def final_dir(run_dir: Path) -> Path:
    return run_dir / FINAL


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def logs_dir(run_dir: Path) -> Path:
    return run_dir / LOGS_DIR


def rank_log(run_dir: Path, rank: int) -> Path:
    return logs_dir(run_dir) / f"rank_{rank}.log"


def launcher_log(run_dir: Path, node_rank: int) -> Path:
    return logs_dir(run_dir) / f"launcher_node_{node_rank}.log"
