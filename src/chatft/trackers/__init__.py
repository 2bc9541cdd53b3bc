"""Experiment trackers: TensorBoard (`logging.tensorboard: true`), Weights & Biases (the `wandb:` section) and
MLflow (the `mlflow:` section), each an optional extra (`chatft[tensorboard]`, `chatft[wandb]`, `chatft[mlflow]`).

In: the validated training (or eval) config, the resolved config (secrets masked), each optimizer step's row of
`metrics.jsonl`, each validation's row and the final artifact's path; for an eval, every target's metrics. Out:
one tracker run per `chatft run`, written from rank 0 only; a training run that resumes from its own checkpoint
continues its tracker runs.

    choice.py              which trackers a config turns on, the info line for a section that resolves to off,
                           and the named error for a missing extra (checked before the model loads)
    base.py                what every tracker offers, and the numbers of a row a tracker records
    tensorboard_writer.py  scalars and text in `<run>/tensorboard`
    wandb_run.py           a W&B run (online, or offline with WANDB_MODE=offline)
    mlflow_run.py          an MLflow run on a tracking server or a local store
    continuation.py        `<run>/trackers.json`: what reopens the tracker runs when training resumes
    fanout.py              the trainer's writer on rank 0: every tracker behind one guard, so a tracker that
                           fails is reported once and left behind while training goes on; and `record_once`,
                           an eval's results sent the same way
"""

from chatft.trackers.choice import require_extras
from chatft.trackers.fanout import Trackers, attached_to, record_once

__all__ = ["Trackers", "attached_to", "record_once", "require_extras"]
