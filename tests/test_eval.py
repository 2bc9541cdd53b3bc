"""eval/model_eval on tiny models: base, adapter and merged as separate validation points with identical
settings, adapter/merged agreement, manifest records, a full-SFT checkpoint as a target, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clirun import assert_error_block
from clirun import run_chatft as chatft
from conftest import load_module_from_path

from chatft.artifacts import file_sha256, read_manifest, weights_fingerprint
from chatft.config.schema import validate_config
from chatft.errors import ChatftError
from chatft.eval.prompts import Prompt
from chatft.eval.results import RESULTS_JSON, RESULTS_MD
from chatft.eval.scoring import answer_tokens, generate_answers, score_answer
from chatft.eval.step import run_eval
from chatft.eval.targets import Target, resolve_targets
from chatft.train.step import train
from chatft.train.model import load_tokenizer, quiet_hub_progress

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHATFT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def write_rows(path: Path, n: int, offset: int = 0) -> Path:
    rows = []
    for i in range(offset, offset + n):
        question, answer = helpers.conversation(i)
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    rows.append({"messages": [  # two assistant turns: the prompt is everything before the last one
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "The capital of Italy is Rome."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_config(output_dir: Path, data: Path, **keys):
    tree = {"targets": ["base", "adapter", "merged"], "dataset": {"path_or_dataset_id": str(data), "seq_length": 256},
            "generation": {"num_prompts": 3, "max_new_tokens": 12}, "torch_dtype": "float32",
            "local_batch_size": 3, "output_dir": str(output_dir), **keys}
    return validate_config("eval", tree, "test")


def snapshot(directory: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("data") / "eval.jsonl", 8, offset=100)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tokenizer, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora-run")
    cfg = helpers.training_config(tiny_model_dir, run_dir, lora=True, step_scheduler__max_steps=16, optimizer__lr=2e-2)
    return train(cfg, run_dir, helpers.prepared(helpers.chat_rows(tokenizer, 24)), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def merged_dir(lora_run, tiny_model_dir, tmp_path_factory):
    """Merged with plain PEFT: the reference the eval's adapter target must agree with."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("merged")
    with quiet_hub_progress():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        PeftModel.from_pretrained(base, lora_run.final_dir).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(lora_run.final_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def three_targets(tiny_model_dir, lora_run, merged_dir, eval_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "three"
    before = {"base": snapshot(tiny_model_dir), "merged": snapshot(merged_dir)}
    cfg = eval_config(out, eval_data, base=str(tiny_model_dir), adapter=str(lora_run.run_dir),  # the run dir
                      merged=str(merged_dir), generation={"num_prompts": 3, "max_new_tokens": 12, "scoring": "contains"})
    results = run_eval(cfg, out)
    return results, out, before


def test_three_targets_are_scored_with_identical_settings(three_targets, eval_data, lora_run, tiny_model_dir, capfd):
    results, out, _ = three_targets
    on_disk = json.loads((out / RESULTS_JSON).read_text())
    assert on_disk["targets"].keys() == {"base", "adapter", "merged"} == results["targets"].keys()
    assert on_disk["dataset"]["sha256"] == file_sha256(eval_data)
    assert on_disk["dataset"]["rows_used"] == 9 and on_disk["dataset"]["rows_in"] == 9
    targets = on_disk["targets"]
    for name, target in targets.items():
        assert target["dataset_sha256"] == file_sha256(eval_data)
        assert target["settings"] == on_disk["settings"]
        metrics = target["metrics"]
        assert metrics["rows"] == 9 and metrics["supervised_tokens"] == on_disk["dataset"]["supervised_tokens"]
        assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-5)
        assert 0.0 <= metrics["token_accuracy"] <= 1.0 and 0.0 <= metrics["contains"] <= 1.0
        assert len(target["model_fingerprint"]) == 64
    assert targets["base"]["model_fingerprint"] == weights_fingerprint(tiny_model_dir)
    assert targets["adapter"]["path"] == str(lora_run.final_dir)  # a run dir means its final/
    assert targets["adapter"]["base"] == str(Path(tiny_model_dir).resolve())
    assert targets["adapter"]["base_fingerprint"] == targets["base"]["model_fingerprint"]
    assert targets["adapter"]["metrics"]["loss"] < targets["base"]["metrics"]["loss"] - 0.3  # it learned
    assert on_disk["settings"]["chat_template"]["origin"] == "tokenizer of base"
    assert on_disk["settings"]["generation"]["prompt_rows"] == [g["row"] for g in on_disk["generations"]]
    # The same prompts for every target; the multi-turn row's prompt ends before its last assistant turn.
    assert len(on_disk["generations"]) == 3
    for item in on_disk["generations"]:
        assert item["answers"].keys() == {"base", "adapter", "merged"}
        assert item["prompt"][-1]["role"] == "user" and item["reference"]
        for answer in item["answers"].values():
            assert answer["tokens"] <= 12 and isinstance(answer["match"], bool)
    markdown = (out / RESULTS_MD).read_text()
    assert "| metric | base | adapter | merged |" in markdown and "| loss |" in markdown and "| contains |" in markdown
    assert "## Generations" in markdown
    assert "adapter vs merged:" in markdown and ": PASS" in markdown


def test_adapter_and_merged_agree(three_targets):
    results, _, _ = three_targets
    check = results["adapter_vs_merged"]
    assert check["passed"] and check["dtype"] == "float32" and check["tolerance"] == 1e-4
    assert check["relative_difference"] < 1e-5
    assert check["merged_records_this_adapter"] is None  # merged with plain PEFT: no manifest says
    adapter, merged = results["targets"]["adapter"]["metrics"], results["targets"]["merged"]["metrics"]
    assert merged["loss"] == pytest.approx(adapter["loss"], rel=1e-5)
    assert merged["token_accuracy"] == pytest.approx(adapter["token_accuracy"])
    for item in results["generations"]:
        assert item["answers"]["adapter"]["text"] == item["answers"]["merged"]["text"]


def test_eval_loss_is_the_training_validation_loss(tiny_model_dir, tokenizer, lora_run, eval_data, tmp_path):
    """The pipeline's masks on the JSONL rows equal the trainer's validation rows, and so does the loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chatft.data.pipeline import prepare_training_data
    from chatft.train import batching, losses

    cfg = eval_config(tmp_path, eval_data, targets=["adapter"], adapter=str(lora_run.final_dir))
    results = run_eval(cfg, tmp_path / "out")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_run.final_dir).eval()
    rows = prepare_training_data(cfg.dataset, load_tokenizer(helpers.training_config(tiny_model_dir, tmp_path).model)).rows
    expected = losses.score_batches(model, batching.micro_batches(rows, 2, 0), torch.device("cpu"))
    assert results["targets"]["adapter"]["metrics"]["loss"] == pytest.approx(expected.loss, rel=1e-5)
    # No `base` given: the adapter loads on the base its manifest records.
    assert results["targets"]["adapter"]["base_source"] == "manifest"


def test_a_model_that_leaks_packed_rows_is_scored_on_padded_batches(lora_run, eval_data, tmp_path, monkeypatch):
    from chatft.train import padding_free

    cfg = eval_config(tmp_path, eval_data, targets=["adapter"], adapter=str(lora_run.final_dir))
    packed = run_eval(cfg, tmp_path / "packed")["targets"]["adapter"]
    monkeypatch.setattr(padding_free, "boundary_leak", lambda *args: 0.5)
    padded = run_eval(cfg, tmp_path / "padded")["targets"]["adapter"]
    assert "scored on padded batches" in " ".join(padded["notes"]) and not packed["notes"]
    assert padded["metrics"]["loss"] == pytest.approx(packed["metrics"]["loss"], rel=1e-5)


def test_validation_is_appended_to_chatft_manifests_only(three_targets, lora_run, merged_dir, tiny_model_dir, eval_data):
    results, out, before = three_targets
    manifest = read_manifest(lora_run.final_dir)
    records = [r for r in manifest["validations"] if r["eval_results"] == str((out / RESULTS_JSON).resolve())]
    assert len(records) == 1
    record = records[0]
    assert record["target"] == "adapter" and record["dataset_sha256"] == file_sha256(eval_data)
    assert record["metrics"] == results["targets"]["adapter"]["metrics"] and record["time"]
    assert record["adapter_merged_agreement"] is True
    assert results["targets"]["adapter"]["validation_recorded"] == str(lora_run.final_dir / "chatft_manifest.json")
    # The base and the plain-PEFT merged dir have no manifest: reported, never touched.
    for name, directory in (("base", tiny_model_dir), ("merged", merged_dir)):
        assert results["targets"][name]["validation_recorded"] is None
        assert snapshot(directory) == before[name]
    assert "no manifest" in (out / RESULTS_MD).read_text()


def test_full_sft_checkpoint_as_merged_target_and_exact_match(tiny_model_dir, tokenizer, eval_data, tmp_path):
    """Any HF checkpoint can be a target; a full-SFT run dir means its final/, which gets the record. A model
    trained to answer one question scores an exact match on it; the base does not."""
    run_dir = tmp_path / "sft"
    question, answer = "What is the capital of France?", "The capital of France is Paris."
    cfg = helpers.training_config(tiny_model_dir, run_dir, step_scheduler__max_steps=30, step_scheduler__num_epochs=30,
                                  optimizer__lr=1e-2,
                                  lr_scheduler__lr_decay_style="constant")
    train(cfg, run_dir, helpers.prepared([helpers.chat_row(tokenizer, question, answer)] * 4), tokenizer=tokenizer)
    data = tmp_path / "france.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    out = tmp_path / "eval"
    results = run_eval(eval_config(out, data, targets=["base", "merged"], base=str(tiny_model_dir),
                                   merged=str(run_dir), generation={"num_prompts": 1, "scoring": "exact_match"}), out)
    merged, base = results["targets"]["merged"], results["targets"]["base"]
    assert merged["path"] == str((run_dir / "final").resolve()) and merged["kind"] == "full"
    assert merged["metrics"]["exact_match"] == 1.0 and base["metrics"]["exact_match"] == 0.0
    assert results["generations"][0]["answers"]["merged"]["stopped"]  # stopped at <|im_end|>
    assert results["adapter_vs_merged"] is None
    validations = read_manifest(run_dir / "final")["validations"]
    assert [v["target"] for v in validations] == ["merged"]
    assert "| exact match | 0/1 | 1/1 |" in (out / RESULTS_MD).read_text()


def test_merged_model_of_other_weights_fails_the_agreement(tiny_model_other_weights_dir, tiny_model_dir, lora_run,
                                                           eval_data, tmp_path):
    out = tmp_path / "eval"
    cfg = eval_config(out, eval_data, targets=["adapter", "merged"], base=str(tiny_model_dir),
                      adapter=str(lora_run.final_dir), merged=str(tiny_model_other_weights_dir),
                      generation={"num_prompts": 0})
    with pytest.raises(ChatftError) as err:
        run_eval(cfg, out)
    assert err.value.id == "merge_not_equivalent" and "adapter and merged disagree" in err.value.message
    written = json.loads((out / RESULTS_JSON).read_text())  # the evidence is written before the step fails
    assert written["adapter_vs_merged"]["passed"] is False
    assert ": FAIL" in (out / RESULTS_MD).read_text()


def test_template_comes_from_the_first_target_that_has_one(tiny_model_no_template_dir, lora_run, eval_data, tmp_path):
    """A template-less base beside a fine-tuned adapter is scored with the adapter's (training) template."""
    cfg = eval_config(tmp_path / "eval", eval_data, targets=["base", "adapter"], base=str(tiny_model_no_template_dir),
                      adapter=str(lora_run.final_dir), generation={"num_prompts": 1})
    results = run_eval(cfg, tmp_path / "eval")
    assert results["settings"]["chat_template"]["origin"] == "tokenizer of adapter"
    assert results["targets"]["adapter"]["base_source"] == "config"  # same weights: the fingerprint matches
    assert results["targets"]["base"]["metrics"]["supervised_tokens"] == results["dataset"]["supervised_tokens"]


def test_adapter_on_another_base_is_refused(tiny_model_other_weights_dir, lora_run, eval_data, tmp_path):
    cfg = eval_config(tmp_path, eval_data, targets=["adapter"], adapter=str(lora_run.final_dir),
                      base=str(tiny_model_other_weights_dir))
    with pytest.raises(ChatftError) as err:
        run_eval(cfg, tmp_path / "out")
    assert err.value.id == "base_model_mismatch" and str(Path(lora_run.final_dir)) in err.value.message
    assert not (tmp_path / "out" / RESULTS_JSON).exists()


def test_adapter_paths_are_resolved_or_refused(lora_run, tiny_model_dir, eval_data, tmp_path):
    def adapter_target(path):
        return resolve_targets(eval_config(tmp_path, eval_data, targets=["adapter"], adapter=str(path)))[0]

    assert adapter_target(lora_run.run_dir).adapter_dir == lora_run.final_dir.resolve()  # a run dir: its final/
    for path, words in ((tmp_path / "nowhere", "does not exist"), (tiny_model_dir, "full model"),
                        (tmp_path, "no adapter_config.json")):
        with pytest.raises(ChatftError) as err:
            adapter_target(path)
        assert err.value.id == "adapter_not_found" and words in err.value.message


def test_a_missing_model_is_refused_before_any_target_is_scored(tiny_model_dir, eval_data, tmp_path):
    cfg = eval_config(tmp_path / "out", eval_data, targets=["base", "merged"], base=str(tiny_model_dir),
                      merged=str(tmp_path / "runs" / "merged"))
    with pytest.raises(ChatftError) as err:
        run_eval(cfg, tmp_path / "out")
    assert err.value.id == "config_invalid" and f"merged={tmp_path / 'runs' / 'merged'}" in err.value.message
    assert "does not exist locally" in err.value.message and not (tmp_path / "out").exists()


def test_output_dir_inside_an_input_is_refused(lora_run, eval_data, tmp_path):
    cfg = eval_config(lora_run.final_dir / "eval", eval_data, targets=["adapter"], adapter=str(lora_run.final_dir))
    with pytest.raises(ChatftError) as err:
        run_eval(cfg, lora_run.final_dir / "eval")
    assert err.value.id == "output_path_overlaps_inputs"


def test_answer_scoring():
    assert score_answer("  The capital of France\nis Paris. ", "the capital of france is paris.", "exact_match")
    assert not score_answer("Paris.", "The capital of France is Paris.", "exact_match")
    assert score_answer("Well: the capital of France is Paris.", "The capital of France is Paris.", "contains")
    assert score_answer("anything", "reference", "none") is None


def test_config_keys():
    cfg = validate_config("eval", {"targets": ["adapter"], "adapter": "a", "dataset": {"path_or_dataset_id": "d"}}, "e")
    assert cfg.base is None and cfg.generation.scoring == "none" and cfg.dataset.train_on == "all_assistant"
    for bad in ({"targets": ["base", "base"], "base": "b"}, {"targets": []}, {"generation": {"scoring": "bleu"}}):
        with pytest.raises(ChatftError) as err:
            validate_config("eval", {"base": "b", "adapter": "a", "merged": "m", "dataset": {"path_or_dataset_id": "d"},
                                     **bad}, "e")
        assert err.value.id == "config_invalid"


# --------------------------------------------------------------------------- the CLI, as a user runs it


def test_cli_merges_then_scores_three_targets(tiny_model_dir, lora_run, eval_data, tmp_path):
    """The user's path: convert/merge_lora, then eval/model_eval on base, adapter and the merged output."""
    merge = chatft("run", "convert/merge_lora", f"lora_checkpoint={lora_run.run_dir}", "output_hf_path=merged",
                   "torch_dtype=float32", "show_progress=false", cwd=tmp_path)
    assert merge.returncode == 0, merge.stderr
    result = chatft("run", "eval/model_eval", "targets=[base,adapter,merged]", f"base={tiny_model_dir}",
                    f"adapter={lora_run.final_dir}", "merged=merged", f"dataset.path_or_dataset_id={eval_data}",
                    "generation.num_prompts=2", "generation.max_new_tokens=8", "torch_dtype=float32",
                    "output_dir=evals/one", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| metric | base | adapter | merged |" in result.stdout and ": PASS**" in result.stdout
    out = tmp_path / "evals" / "one"
    assert {p.name for p in out.iterdir()} == {"job.yaml", RESULTS_JSON, RESULTS_MD}
    results = json.loads((out / RESULTS_JSON).read_text())
    assert results["adapter_vs_merged"]["merged_records_this_adapter"] is True
    record = read_manifest(tmp_path / "merged")["validations"][-1]  # chatft's merge wrote a manifest
    assert record["target"] == "merged" and record["adapter_merged_agreement"] is True


def test_cli_errors_are_blocks_without_traceback(tiny_model_dir, tiny_model_no_template_dir, eval_data, tmp_path):
    missing = chatft("run", "eval/model_eval", "targets=[base,adapter]", f"base={tiny_model_dir}",
                     "adapter=runs/nope/final", f"dataset.path_or_dataset_id={eval_data}", "output_dir=e1", cwd=tmp_path)
    assert "runs/nope/final" in assert_error_block(missing, "adapter_not_found")
    no_template = chatft("run", "eval/model_eval", "targets=[base]", f"base={tiny_model_no_template_dir}",
                         f"dataset.path_or_dataset_id={eval_data}", "output_dir=e2", cwd=tmp_path)
    assert "dataset.chat_template" in assert_error_block(no_template, "chat_template_missing")


def test_prompts_are_answered_in_batches_as_one_at_a_time(tiny_model_dir, tokenizer, monkeypatch):
    """Generation is memory-bound on a CPU (every new token reads all the weights), so prompts of different
    lengths are answered together, left-padded, `local_batch_size` at a time; each answer is the one the prompt
    gets alone."""
    from chatft.train.model import load_model

    def cfg(local_batch_size: int):
        return eval_config(Path("out"), Path("rows.jsonl"), targets=["base"], base=str(tiny_model_dir),
                           local_batch_size=local_batch_size)

    target = Target("base", str(tiny_model_dir))
    model = load_model(target.model_section(cfg(1)), torch.device("cpu"), torch.float32, key="base").eval()
    questions = ["Hi", "What is the capital of Italy? Please answer in one short sentence.", "Name three colours."]
    prompts = []
    for number, question in enumerate(questions, start=1):
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompts.append(Prompt(number, messages, "Rome", list(ids["input_ids"])))
    assert len({len(p.input_ids) for p in prompts}) == 3  # padding is exercised
    calls = []
    original = type(model).generate

    def counted(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", counted)
    alone = generate_answers(model, prompts, tokenizer, cfg(1), torch.device("cpu"))
    assert calls == [1, 1, 1]
    calls.clear()
    together = generate_answers(model, prompts, tokenizer, cfg(2), torch.device("cpu"))
    assert sorted(calls) == [1, 2]
    assert together == alone


def test_an_answer_ends_at_its_first_stop_token():
    assert answer_tokens([5, 6, 2, 0, 0], stop=[2]) == ([5, 6, 2], True)  # what follows a stop is padding
    assert answer_tokens([5, 0, 6], stop=[2]) == ([5, 0, 6], False)  # a generated pad id before any stop stays
    assert answer_tokens([], stop=[2]) == ([], False)


def test_results_record_how_conversations_became_rows(tiny_model_dir, eval_data, tmp_path):
    """`dataset.multi_turn` and `dataset.chat_template_kwargs` shape the rows and prompts every target is scored
    on, so the results' settings and the table keep them, beside the expansion they made."""
    out = tmp_path / "eval"
    data = {"path_or_dataset_id": str(eval_data), "seq_length": 256, "multi_turn": "per_turn",
            "chat_template_kwargs": {"enable_thinking": False, "hf_token": "not-for-the-record"}}
    results = run_eval(eval_config(out, eval_data, targets=["base"], base=str(tiny_model_dir), dataset=data,
                                   generation={"num_prompts": 0}), out)
    settings = results["settings"]
    assert settings["multi_turn"] == "per_turn"
    assert settings["chat_template_kwargs"] == {"enable_thinking": False, "hf_token": "******"}
    # the two-turn conversation became two rows, one per assistant turn
    assert results["dataset"]["rows_in"] == 9 and results["dataset"]["rows_used"] == 10
    assert (results["dataset"]["expansion"]["rows_before"], results["dataset"]["expansion"]["rows_after"]) == (9, 10)
    assert "multi_turn per_turn, chat_template_kwargs enable_thinking=False, hf_token=******" in \
        (out / RESULTS_MD).read_text()
    assert "not-for-the-record" not in (out / RESULTS_JSON).read_text()


def test_qlora_base_on_a_plain_lora_adapter_is_one_point_with_a_warning(lora_run, eval_data, tmp_path):
    from chatft.eval.targets import qlora_base_unused

    cfg = eval_config(tmp_path, eval_data, targets=["adapter"], adapter=str(lora_run.final_dir), qlora_base="both")
    targets = resolve_targets(cfg)
    assert [(t.name, t.quantization) for t in targets] == [("adapter", None)]
    assert "qlora_base=both has no effect" in qlora_base_unused(cfg, targets)
    assert qlora_base_unused(cfg.model_copy(update={"qlora_base": "as_trained"}), targets) is None
    with pytest.raises(ChatftError) as err:  # nothing to choose a base for
        eval_config(tmp_path, eval_data, targets=["base"], base="b", qlora_base="full_precision")
    assert err.value.id == "config_invalid" and "qlora_base=full_precision" in err.value.message
