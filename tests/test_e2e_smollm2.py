"""The user's path on the real SmolLM2-135M-Instruct and real chat data, through the CLI only:
prep ShareGPT data → LoRA fine-tune → load the adapter with plain peft and generate → evaluate the
adapter → merge → evaluate the merged model, whose loss must agree with the adapter's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from clirun import run_chatft as chatft

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
def test_prep_then_lora_on_smollm2_then_generate(smollm2_dir, tmp_path):
    env = {**os.environ, "CHATFT_DEMO_MODEL": str(smollm2_dir), "CHATFT_RUNS_DIR": str(tmp_path / "runs"),
           "CHATFT_CACHE_DIR": str(tmp_path / "cache")}
    prep = chatft("prep", str(SHARED_DATA / "dummy_conversation.json"), "-o", "data/train.jsonl",
                  "--val-fraction", "0.05", cwd=tmp_path, env=env)
    assert prep.returncode == 0, prep.stderr
    train = chatft("run", "peft/automodel", "-c", "tiny", "dataset.seq_length=256", "step_scheduler.max_steps=3",
                   "step_scheduler.ckpt_every_steps=2", "validation_dataset.path_or_dataset_id=data/train.val.jsonl",
                   "peft.dim=8", cwd=tmp_path, env=env)
    assert train.returncode == 0, train.stderr
    run = tmp_path / "runs" / "tiny-peft"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step_2"
    manifest = json.loads((run / "final" / "chatft_manifest.json").read_text())
    assert manifest["kind"] == "lora" and manifest["lora"]["r"] == 8
    assert manifest["data"]["train"]["rows_in"] == 475 and manifest["data"]["train"]["rows_used"] == 475

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model = PeftModel.from_pretrained(base, run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0][prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

    evaluate = ["run", "eval/model_eval", "-c", "tiny", f"base={smollm2_dir}", "dataset.path_or_dataset_id=data/train.val.jsonl",
                "generation.num_prompts=1", "generation.max_new_tokens=16"]
    adapter_eval = chatft(*evaluate, "targets=[adapter]", f"adapter={run}", "output_dir=eval-adapter", cwd=tmp_path, env=env)
    assert adapter_eval.returncode == 0, adapter_eval.stderr
    assert len(json.loads((run / "final" / "chatft_manifest.json").read_text())["validations"]) == 1
    merge = chatft("run", "convert/merge_lora", f"lora_checkpoint={run}", "output_hf_path=merged", "require_validated=true",
                   cwd=tmp_path, env=env)
    assert merge.returncode == 0, merge.stderr
    merged_eval = chatft(*evaluate, "targets=[adapter,merged]", f"adapter={run}", "merged=merged", "output_dir=eval-merged",
                         cwd=tmp_path, env=env)
    assert merged_eval.returncode == 0, merged_eval.stderr
    results = json.loads((tmp_path / "eval-merged" / "eval_results.json").read_text())
    first = json.loads((tmp_path / "eval-adapter" / "eval_results.json").read_text())
    assert results["adapter_vs_merged"]["passed"] and results["adapter_vs_merged"]["relative_difference"] < 1e-4
    assert results["targets"]["adapter"]["metrics"]["loss"] == first["targets"]["adapter"]["metrics"]["loss"]
