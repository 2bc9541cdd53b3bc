"""Training: `sft/automodel` and `peft/automodel`.

In: a validated `TrainingConfig` and `PreparedData` (token ids + loss masks). Out: a run dir with
metrics, resumable checkpoints and `final/`, a plain Hugging Face artifact (full weights or a PEFT
adapter) with `chatft_manifest.json`.

Modules, in the order a run uses them:
  step.py          `train()`: the one way into training (CLI, tests, bench); `run_step(compiled)` for `chatft run`
  run_dir.py       how a run starts in its dir: fresh, over an earlier run, or resumed (`resume_check`)
  resume_check.py  may a checkpoint continue with today's settings: safe changes recorded, the rest refused
  precision.py     which dtype weights, trained parameters, AdamW moments, compute and the artifact get
  model.py         device, dtype, model + tokenizer loading, LoRA wrapping, parameter counts
  recompute.py     activation checkpointing modes: full, or selective (cheap ops recomputed)
  memory.py        the memory estimate and the `oom` error with its advice ladder
  batching.py      epoch order (shardable, optionally length-grouped), micro-batches, collate
  padding_free.py  the check that padding-free rows keep conversations apart on the loaded model
  attention.py     per-conversation attention for padding-free rows (SDPA loop, varlen flash on GPU)
  losses.py        summed loss and token accuracy at supervised positions (training and eval)
  chunked_head.py  the output head + cross-entropy a chunk of positions at a time
  cross_entropy.py the summed cross-entropy both loss heads share
  layer_compile.py `compile.enabled`: torch.compile per decoder layer
  schedule.py      the learning-rate schedule (a pure function of the step)
  stochastic_rounding.py  AdamW over bfloat16 weights with stochastic rounding (master_weights option)
  queued_step.py   a step's loss and gradient norm kept on the device until logged (`PendingRow`)
  stop_signal.py   SIGTERM/SIGINT: finish the step, checkpoint, exit 128 + signal
  checkpoints.py   resumable checkpoints: atomic save, LATEST, keep_last, loading without pickle
  distributed.py   the processes of a run (torchrun): rank, collectives, per-rank logs, strategy (ddp | fsdp2)
  sharding.py      FSDP2: weights, gradients and optimizer states split across the processes
  metrics.py       metrics.jsonl / validation.jsonl, loss.png, progress display (trackers: `chatft.trackers`)
  final_artifact.py  final/: the model or adapter, tokenizer and manifest, written atomically
  loop.py          the Trainer: setup, then the whole loop in one readable method
The names inside a run dir are in `chatft.run_layout`.
"""
