"""How a run starts in its directory: fresh, over an earlier run, or from a checkpoint.

In: the validated config and the run dir. Out: the checkpoint to resume from, or None to start fresh; refusals for
a finished run that would be overwritten, for `resume=false` beside an earlier attempt's checkpoints, and (before
anything loads) for a resume whose settings change what is trained (`resume_check`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from chatft.config.schema import TrainingConfig
from chatft.errors import ChatftError
from chatft.run_layout import RUN_OUTPUTS, checkpoints_dir, final_dir
from chatft.train import checkpoints, resume_check


def prepare_run_dir(cfg: TrainingConfig, run_dir: Path) -> Path | None:
    """Decide how this run starts: returns the checkpoint to resume from, or None to start fresh.

    A dir holding a finished run (`final/`) is refused unless `checkpoint.overwrite=true` (start over)
    or `checkpoint.resume=PATH` (continue from that checkpoint, e.g. with a larger max_steps).
    `resume=false` in a dir with checkpoints is refused too (unless overwrite): they would mix.
    """
    resume = cfg.checkpoint.resume
    explicit = resume not in ("auto", "false")
    if cfg.checkpoint.overwrite:
        source = checkpoints.resolve_resume_path(resume) if explicit else None
        if source is not None and checkpoints_dir(run_dir).resolve() in source.resolve().parents:
            raise ChatftError(
                "config_invalid",
                f"checkpoint.overwrite=true would delete {source}, the checkpoint checkpoint.resume names",
                "drop checkpoint.overwrite to continue from it, or resume from a checkpoint of another run dir",
            )
        for name in RUN_OUTPUTS:
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return source
    if final_dir(run_dir).exists() and not explicit:
        raise ChatftError(
            "config_invalid",
            f"{run_dir} holds a finished run ({final_dir(run_dir)} exists); starting again would overwrite it",
            "pick a new checkpoint.checkpoint_dir, or checkpoint.overwrite=true to start over there, or "
            f"checkpoint.resume={checkpoints_dir(run_dir) / 'step_N'} to continue from a checkpoint",
        )
    checkpoints.remove_partial_saves(run_dir)
    if explicit or resume == "auto":
        source = checkpoints.resolve_resume_path(resume) if explicit else checkpoints.latest_checkpoint(run_dir)
        if source is not None:  # before anything loads: a changed run is refused here, not after the model
            resume_check.check_resume(cfg, checkpoints.read_state(source), str(source))
        return source
    earlier = checkpoints.complete_checkpoints(checkpoints_dir(run_dir))
    if earlier:  # resume=false: a fresh start must not mix its checkpoints with an earlier attempt's
        raise ChatftError(
            "config_invalid",
            f"checkpoint.resume=false but {run_dir} holds checkpoints of an earlier attempt (up to {earlier[-1].name})",
            "checkpoint.resume=auto to continue from them, checkpoint.overwrite=true to delete them and start "
            "over, or a new checkpoint.checkpoint_dir",
        )
    return None
