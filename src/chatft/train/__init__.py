"""Training: `sft/automodel` and `peft/automodel`.

In: a validated `TrainingConfig` and `PreparedData` (token ids + loss masks). Out: a run dir with
metrics, resumable checkpoints and `final/`, a plain Hugging Face artifact (full weights or a PEFT
adapter) with `chatft_manifest.json`.

Modules, in the order a run uses them:
  model.py        device, dtype, model + tokenizer loading, LoRA wrapping, parameter counts
  memory.py       the memory estimate and the `oom` error with its advice ladder
  batching.py     epoch order (shardable, optionally length-grouped), micro-batches, collate
  schedule.py     the learning-rate schedule (a pure function of the step)
  checkpoints.py  resumable checkpoints: atomic save, LATEST, keep_last, loading without pickle
  metrics.py      metrics.jsonl / validation.jsonl, loss.png, TensorBoard, progress display
  loop.py         the Trainer: setup, then the whole loop in one readable method
  step.py         `run_step(compiled)`: the entry point `chatft run` dispatches to
"""
