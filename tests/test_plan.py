"""`chatft plan`: one test per routing rule, the issue's scenarios, written configs that compile, Mermaid edges
that type-check, model sources and refusals, and the CLI's exit codes and error blocks."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from clirun import assert_error_block as error_block
from clirun import run_chatft as chatft

from chatft.errors import ChatftError
from chatft.plan import RULES, PlanRequest, make_plan, run_plan
from chatft.plan.fit import GB, Layout, estimate
from chatft.plan.models import resolve_model
from chatft.plan.output import config_path, differing, step_settings
from chatft.steps.registry import all_steps, is_a
from chatft.train import memory
from chatft.train.distributed import strategy_for

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = SHARED_DATA / "alpaca_en_demo.json"
SHAREGPT = SHARED_DATA / "dummy_conversation.json"
needs_shared_data = pytest.mark.skipif(not ALPACA.is_file(), reason="shared chat data not present")

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def plan(model: str = SMOL, gpus: int = 1, **kwargs):
    return make_plan(PlanRequest(gpus=gpus, model=model, **kwargs))


def fired(result) -> dict[str, str]:
    return {rule.id: trigger for rule, trigger in result.decision.fired}


def chat_jsonl(path: Path, rows: int, words: int = 20) -> Path:
    with path.open("w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"question {i} " + "word " * words},
                                              {"role": "assistant", "content": "answer " * words}]}) + "\n")
    return path


def packed_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input_ids": [[1, 2, 3]], "loss_mask": [[0, 1, 1]]}), path)
    return path


def test_every_rule_is_a_table_row_with_a_test():
    ids = [rule.id for rule in RULES]
    assert len(ids) == len(set(ids)) == 13
    source = Path(__file__).read_text()
    for rule in RULES:
        assert rule.constraint and rule.decision
        assert f"def test_rule_{rule.id}" in source, f"no test for rule {rule.id}"


# --------------------------------------------------------------------------- one test per rule


def test_rule_hf_output():
    assert "default output" in fired(plan())["hf_output"]
    assert fired(plan(want="hf"))["hf_output"] == "--want hf"
    assert "hf_output" not in fired(plan(want="adapter"))


def test_rule_few_gpus_or_small_model():
    assert fired(plan(gpus=2))["few_gpus_or_small_model"].startswith("2 GPUs in all")
    assert "few_gpus_or_small_model" not in fired(plan("meta-llama/Llama-3.1-70B-Instruct", gpus=8, nodes=2))


def test_rule_hf_model():
    assert "not a Nemotron" in fired(plan())["hf_model"]
    assert "hf_model" not in fired(plan("nvidia/NVIDIA-Nemotron-Nano-9B-v2"))


def test_rule_megatron_output():
    result = plan(LLAMA_8B, gpus=8, want="megatron")
    assert "megatron_output" in fired(result) and result.decision.route == "megatron"
    assert result.decision.refusal is not None and result.decision.refusal.id == "route_not_supported"
    assert "Megatron-Bridge" in result.decision.refusal.hint and result.chain.steps == []


def test_rule_nemotron_parity():
    result = plan("nvidia/Nemotron-3-Nano-30B-A3B", gpus=8, nodes=4)
    assert "Nemotron 3 Nano" in fired(result)["nemotron_parity"]
    assert result.decision.route == "megatron" and result.decision.refusal is None  # said, not refused
    assert "nemotron_parity" not in fired(plan("nvidia/Nemotron-3-Nano-30B-A3B", gpus=8, nodes=1))
    assert "nemotron_parity" not in fired(plan("nvidia/Nemotron-3-Nano-30B-A3B", gpus=8, nodes=4, want="hf"))
    assert "nemotron_parity" not in fired(plan(LLAMA_8B, gpus=8, nodes=4))


def test_rule_megatron_input(tmp_path):
    result = plan(data=str(packed_parquet(tmp_path / "train.parquet")))
    assert "packed rows" in fired(result)["megatron_input"] and result.decision.route == "megatron"
    assert result.decision.refusal.id == "packed_parquet_used_with_automodel"
    assert "Megatron-Bridge" in result.decision.refusal.hint
    (tmp_path / "text_document.bin").write_bytes(b"\0")
    (tmp_path / "text_document.idx").write_bytes(b"\0")
    indexed = plan(data=str(tmp_path / "text_document.bin"))
    assert "megatron_input" in fired(indexed) and indexed.decision.refusal.id == "route_not_supported"


def test_rule_model_parallelism():
    result = plan("meta-llama/Llama-3.1-405B-Instruct", gpus=2)  # not even LoRA on a 4-bit base fits
    assert "tensor/pipeline" in fired(result)["model_parallelism"]
    assert result.decision.route == "megatron" and result.decision.refusal is None
    assert result.facts.full_fit is None and result.facts.lora_fit is None and result.facts.qlora_fit is None
    # with 8 GPUs the frozen base shards over FSDP2 and LoRA fits: chatft keeps the job
    bigger = plan("meta-llama/Llama-3.1-70B-Instruct", gpus=8)
    assert "model_parallelism" not in fired(bigger) and bigger.fit.strategy == "fsdp2"


def test_rule_qlora():
    def fired_and_plan(model: str, gpus: int) -> tuple[dict[str, str], object]:
        result = plan(model, gpus=gpus)
        return fired(result), result

    rules, result = fired_and_plan("meta-llama/Llama-3.1-70B-Instruct", 2)  # 2 x 80 GB: LoRA does not fit, QLoRA does
    assert "4-bit NF4 base" in rules["qlora"] and "model_parallelism" not in rules
    assert result.decision.quantization == "nf4" and result.fit.quantization == "nf4" and result.fit.fits
    rules, result = fired_and_plan("meta-llama/Llama-3.1-405B-Instruct", 2)  # not even on a 4-bit base
    assert "qlora" not in rules and "tensor/pipeline" in rules["model_parallelism"]
    assert result.facts.qlora_fit is None
    rules, result = fired_and_plan("meta-llama/Llama-3.1-70B-Instruct", 8)  # LoRA fits (FSDP2): no 4-bit base
    assert "qlora" not in rules and result.decision.quantization is None


def test_fsdp2_estimates_count_the_gathered_layers():
    model = resolve_model("meta-llama/Llama-3.1-70B-Instruct")
    layout = Layout(gpus=8, nodes=1, memory=80 * GB)
    sharded = estimate(model, layout, lora=True, seq_length=2048, local_batch_size=1, strategy="fsdp2")
    replicated = estimate(model, layout, lora=True, seq_length=2048, local_batch_size=1, strategy="ddp")
    # Two of the 80 decoder layers whole in bfloat16 (about 0.86B parameters each: 3.4 GB), and the root unit
    # (embeddings and untied head, 2 x 128256 x 8192: 3.9 GB) whole, on top of the shards.
    assert 7.1 * GB < sharded.gathered < 7.8 * GB and replicated.gathered == 0
    assert "gathered layers" in sharded.line() and "gathered layers" not in replicated.line()


def test_rule_adapter_only():
    result = plan(gpus=8, want="adapter")
    assert fired(result)["adapter_only"] == "--want adapter"
    assert result.decision.train_step == "peft/automodel" and not result.decision.merge


def test_rule_lora_first(tmp_path):
    small = plan(gpus=8, data=str(chat_jsonl(tmp_path / "rows.jsonl", 50)))
    assert fired(small)["lora_first"] == "50 clean rows (under ~10k)"
    tight = plan(LLAMA_8B, gpus=8, gpu_memory_gb=40)
    assert fired(tight)["lora_first"].startswith("tight memory: full SFT needs")
    few = plan(gpus=2)
    assert fired(few)["lora_first"] == "2 GPUs"
    for result in (small, tight, few):
        assert result.decision.lora and result.decision.train_step == "sft/automodel"
    assert "lora_first" not in fired(plan(gpus=8))


def test_rule_prep_first(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(5)]))
    result = plan(data=str(alpaca))
    assert fired(result)["prep_first"].endswith("is in alpaca format")
    assert result.chain.steps[0].id == "data_prep/chat_jsonl"
    assert "prep_first" not in fired(plan(data=str(chat_jsonl(tmp_path / "rows.jsonl", 5))))
    hub = plan(data="someorg/chat-data")
    assert "Hub dataset id" in fired(hub)["prep_first"]


def test_rule_merge_adapter():
    result = plan(gpus=1)
    assert "standalone" in fired(result)["merge_adapter"]
    assert [s.id for s in result.chain.steps][-2:] == ["convert/merge_lora", "eval/model_eval"]
    assert "merge_adapter" not in fired(plan(gpus=1, want="adapter"))
    assert "merge_adapter" not in fired(plan(gpus=8))  # full SFT: final/ is already a checkpoint_hf


def test_rule_eval_bookend(tmp_path):
    result = plan(gpus=1, out=str(tmp_path))
    assert "changes the model's answers" in fired(result)["eval_bookend"]
    evals = [s for s in result.chain.steps if s.id == "eval/model_eval"]
    assert [s.role for s in evals] == ["eval_before", "eval_after"]
    assert result.chain.steps.index(evals[0]) < [s.role for s in result.chain.steps].index("train")
    before, after = (step_settings(result, s) for s in evals)
    for key in ("dataset.path_or_dataset_id", "dataset.seq_length", "torch_dtype"):
        assert before[key] == after[key]  # identical settings
    assert before["targets"] == ["base"] and after["targets"] == ["base", "adapter", "merged"]


# --------------------------------------------------------------------------- the scenarios


def test_two_gpus_adapter_wanted_on_chat_jsonl_is_peft_without_prep_or_packing(tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl", 200)
    result = plan(SMOL, gpus=2, want="adapter", data=str(data), out=str(tmp_path / "plan"))
    assert result.decision.train_step == "peft/automodel" and result.decision.in_chatft
    assert [s.id for s in result.chain.steps] == ["eval/model_eval", "peft/automodel", "eval/model_eval"]
    train = next(s for s in result.chain.steps if s.role == "train")
    settings = step_settings(result, train)
    assert settings["dataset.path_or_dataset_id"] == str(data)
    assert "packed_sequence.packed_sequence_size" not in settings  # the default 0: no packing
    assert result.fit.strategy == "ddp" and settings["run.env.nprocs_per_node"] == 2  # replicated on both GPUs
    assert settings["step_scheduler.global_batch_size"] % (settings["step_scheduler.local_batch_size"] * 2) == 0


def test_four_gpus_fine_tuning_an_8b_model_goes_lora_because_full_sft_does_not_fit():
    result = plan(LLAMA_8B, gpus=4, gpu_memory_gb=40)
    assert not result.facts.full_start.fits
    assert result.decision.train_step == "sft/automodel" and result.decision.lora
    assert "tight memory" in fired(result)["lora_first"] and result.fit.fits and result.fit.lora
    assert result.decision.merge  # a fine-tuned model was asked for: the adapter is merged
    train = next(s for s in result.chain.steps if s.role == "train")
    assert step_settings(result, train)["peft"] == "lora"


@needs_shared_data
def test_alpaca_json_gets_the_prep_step_first_and_sizes_seq_length(tmp_path):
    result = plan(data=str(ALPACA), out=str(tmp_path))
    data = result.facts.data
    assert data.format == "alpaca" and data.rows_in == data.rows_clean == 999
    assert result.chain.steps[0].id == "data_prep/chat_jsonl"
    assert result.facts.seq_length == 1024 and data.token_quantiles["p99"] <= 1024
    assert "small data" not in fired(result)["lora_first"] and "999 clean rows" in fired(result)["lora_first"]
    prep = step_settings(result, result.chain.steps[0])
    assert prep["format"] == "alpaca" and prep["val_fraction"] == 0.05
    sharegpt = plan(data=str(SHAREGPT))
    assert sharegpt.facts.data.format == "sharegpt" and "prep_first" in fired(sharegpt)


def test_a_model_that_fits_fully_on_8x141gb_gets_full_sft_with_its_estimate(tmp_path):
    result = plan(LLAMA_8B, gpus=8, gpu_memory_gb=141, out=str(tmp_path))
    assert not result.decision.lora and result.decision.train_step == "sft/automodel"
    assert result.fit.strategy == "fsdp2" and result.fit.fits and result.fit.total < 141 * GB
    run_plan(PlanRequest(gpus=8, model=LLAMA_8B, gpu_memory_gb=141, out=str(tmp_path)))
    text = (tmp_path / "plan.md").read_text()
    assert "full SFT with `sft/automodel`" in text
    assert re.search(r"full SFT \(FSDP2-sharded, local_batch_size 4\): [\d.]+ GB per GPU, fits in 141.0 GB", text)


def test_cli_packed_parquet_is_refused_naming_megatron_bridge(tmp_path):
    data = packed_parquet(tmp_path / "train.parquet")
    result = chatft("plan", "--gpus", "2", "--model", SMOL, "--data", str(data), "--out", str(tmp_path / "p"))
    stderr = error_block(result, "packed_parquet_used_with_automodel")
    assert "Megatron-Bridge" in stderr
    assert "[megatron_input] packed Parquet or bin/idx input" in result.stdout  # the reasoning is printed
    assert not (tmp_path / "p").exists()  # a refusal writes nothing


def test_cli_want_megatron_is_explained_as_outside_chatft(tmp_path):
    result = chatft("plan", "--gpus", "8", "--model", LLAMA_8B, "--want", "megatron", "--out", str(tmp_path / "p"))
    stderr = error_block(result, "route_not_supported")
    assert "Megatron-Bridge" in stderr and "--want hf" in stderr
    assert "outside chatft: Megatron-Bridge" in result.stdout and "[megatron_output]" in result.stdout


# --------------------------------------------------------------------------- written configs and the chain


def _mermaid_edges(markdown: str) -> list[tuple[str, str, str, str, str]]:
    block = markdown.split("```mermaid\n", 1)[1].split("```", 1)[0]
    node = r'(\w+)\[\(?"?([^\]"]+?)"?\)?\]'
    edges = []
    for line in block.splitlines()[1:]:
        match = re.fullmatch(rf"\s*{node} -->\|(\w+)\| {node}\s*", line)
        assert match, line
        edges.append(match.groups())
    return edges


def test_written_configs_compile_and_the_mermaid_edges_type_check(tmp_path):
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"hi {i}"},
                                                    {"from": "gpt", "value": "hello"}]} for i in range(150)]))
    out = tmp_path / "plan dir"  # a space in the path: the commands quote it
    result = run_plan(PlanRequest(gpus=2, model=SMOL, data=str(data), out=str(out)))
    roles = [s.role for s in result.chain.steps]
    assert roles == ["prep", "eval_before", "train", "merge", "eval_after"]
    text = (out / "plan.md").read_text()
    steps = all_steps()
    for index, step in enumerate(result.chain.steps, start=1):
        path = config_path(result, index, step)
        written = yaml.safe_load(path.read_text())
        default = Path(written.pop("defaults"))
        assert default.is_absolute() and default == steps[step.id].config_dir / "default.yaml"
        assert written == differing(step.id, step_settings(result, step))  # only keys that differ
        assert f"'{path}'" in text  # the exact command, quoted
    commands = plan_commands(out)
    assert [argv[2] for argv in commands] == [step.id for step in result.chain.steps]
    # LoRA on 2 GPUs fits replicated: training starts both processes (a dry run starts none)
    assert commands[2][-2:] == ["--nproc-per-node", "2"]
    for argv in commands:
        assert_runs(argv, tmp_path)
    assert not (out / "runs").exists()  # dry runs write nothing
    edges = _mermaid_edges(text)
    labels = {key: label for key, label, *_ in edges} | {e[3]: e[4] for e in edges}
    assert {labels[k] for k in ("P", "E0", "T", "G", "E1")} == {
        "data_prep/chat_jsonl", "eval/model_eval", "sft/automodel", "convert/merge_lora"}
    assert ("T", "sft/automodel", "checkpoint_lora", "G", "convert/merge_lora") in edges
    inputs = {"D": "chat_data", "M": "checkpoint_hf"}
    for src_key, src, type_name, dst_key, dst in edges:
        produced = [inputs[src_key]] if src_key in inputs else [p.type for p in steps[src].produces]
        assert type_name in produced, (src, type_name)
        assert any(is_a(type_name, port.type) for port in steps[dst].consumes), (dst, type_name)


def plan_commands(out: Path) -> list[list[str]]:
    """The commands plan.md lists, in order."""
    block = (out / "plan.md").read_text().split("```sh\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def filled_in(argv: list[str]) -> list[str]:
    """A several-machine command with its placeholders filled in as the user would on the first machine."""
    return [{"R": "0", "HOST:PORT": "localhost:29500"}.get(arg, arg) for arg in argv]


def assert_runs(argv: list[str], cwd: Path) -> str:
    """Accepted by the real `chatft run` (--dry-run: it compiles, and starts no processes), with a training
    config sized for the processes the command starts, passing the refusals training makes before anything
    loads, and not an fsdp2 config (several processes would train it replicated). Returns stderr."""
    from chatft.config.compile import compile_config
    from chatft.train.step import check_supported

    assert argv[:2] == ["chatft", "run"], argv
    argv = filled_in(argv)
    compiled = chatft(*argv[1:], "--dry-run", cwd=cwd)
    assert compiled.returncode == 0, compiled.stderr
    assert "fsdp2" not in compiled.stderr, compiled.stderr
    step = all_steps()[argv[2]]
    if step.config_schema == "training":
        config = compile_config(step, argv[argv.index("-c") + 1]).validated
        check_supported(config)
        flag = {name: int(argv[argv.index(name) + 1]) for name in ("--nproc-per-node", "--nnodes") if name in argv}
        world = flag.get("--nproc-per-node", 1) * flag.get("--nnodes", 1)
        assert config.data_parallel_size() == world, (argv, config.data_parallel_size())
        sched = config.step_scheduler
        assert sched.global_batch_size % (sched.local_batch_size * world) == 0
    else:
        assert "--nproc-per-node" not in argv, argv
    return compiled.stderr


def train_estimate_shown(result, text: str) -> str:
    """The per-GPU figure plan output shows for the chosen training: the replicated (ddp) one of `estimate`."""
    fit = result.fit
    again = estimate(result.facts.model, result.facts.layout, lora=fit.lora, seq_length=result.facts.seq_length,
                     local_batch_size=fit.local_batch_size, activation_checkpointing=fit.activation_checkpointing,
                     strategy="ddp")
    assert again == fit and fit.line() in text  # the memory line, exactly
    assert f"{fit.total / GB:,.1f} GB per GPU" in text.split("```sh", 1)[1]  # and in the note on the command
    return fit.line()


def test_an_8_gpu_lora_plan_trains_on_8_processes(tmp_path):
    """LoRA of an 8B model: replicated does not fit at local_batch_size 4 but does at 2, which the ladder
    prefers to sharding at 4; the training command starts 8 processes and its config is sized for them."""
    out = tmp_path / "plan"
    result = run_plan(PlanRequest(gpus=8, model=LLAMA_8B, want="adapter", out=str(out)))
    assert result.fit.strategy == "ddp" and result.fit.local_batch_size == 2 and result.fit.fits
    commands = plan_commands(out)
    train = next(argv for argv in commands if argv[2] == "peft/automodel")
    assert train[3:] == ["-c", str(out / "2-peft.yaml"), "--nproc-per-node", "8"]
    for argv in commands:
        assert_runs(argv, tmp_path)
    config = yaml.safe_load((out / "2-peft.yaml").read_text())
    assert config["run"] == {"env": {"nprocs_per_node": 8}} and "strategy" not in config["distributed"]  # auto
    text = (out / "plan.md").read_text()
    assert "on 8 processes (DDP, replicated)" in text and "8 processes x 2 accumulation step(s)" in text
    train_estimate_shown(result, text)


def test_a_multi_node_plan_writes_the_command_for_each_node(tmp_path):
    out = tmp_path / "plan"
    result = run_plan(PlanRequest(gpus=8, model=SMOL, gpu_memory_gb=80, nodes=2, out=str(out)))
    assert not result.decision.lora and result.fit.strategy == "ddp"  # full SFT of a small model: replicated
    commands = plan_commands(out)
    assert [argv[2] for argv in commands] == [step.id for step in result.chain.steps]
    train = next(argv for argv in commands if argv[2] == "sft/automodel")
    assert train[5:] == ["--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "R", "--rdzv-endpoint", "HOST:PORT"]
    for argv in commands:
        assert_runs(argv, tmp_path)
    config = yaml.safe_load((out / "2-sft.yaml").read_text())
    assert config["run"] == {"env": {"nodes": 2, "nprocs_per_node": 8}}
    assert config["step_scheduler"]["global_batch_size"] % (result.fit.local_batch_size * 16) == 0
    text = (out / "plan.md").read_text()
    assert "`R` replaced by that machine's node rank (0 to 1)" in text and "`HOST:PORT` by a free port" in text
    assert "shared file system" in text
    assert "`chatft run STEP -c CONFIG --launcher slurm --nodes 2 --gpus-per-node 8`" in text
    assert re.search(r"full SFT \(DDP, replicated, local_batch_size \d\): [\d.]+ GB per GPU, fits", text)
    train_estimate_shown(result, text)


def test_training_that_fits_only_sharded_gets_an_fsdp2_command(tmp_path):
    from chatft.config.compile import compile_config

    """Full SFT of an 8B model fits on 8 x 141 GB only sharded: the plan writes a training config that shards
    (what `auto` does for full SFT on several processes), whose per-process estimate is training's own, and a
    command for every step."""
    out = tmp_path / "plan"
    result = run_plan(PlanRequest(gpus=8, model=LLAMA_8B, gpu_memory_gb=141, out=str(out)))
    assert not result.decision.lora and result.fit.strategy == "fsdp2" and result.fit.fits
    commands = plan_commands(out)
    assert [argv[2] for argv in commands] == [step.id for step in result.chain.steps]
    train = next(argv for argv in commands if argv[2] == "sft/automodel")
    assert train[5:] == ["--nproc-per-node", "8"]
    for argv in commands:
        assert_runs(argv, tmp_path)
    text = (out / "plan.md").read_text()
    assert "not runnable" not in text and "planned yet" not in text
    assert re.search(r"full SFT \(DDP, replicated, local_batch_size 1, activation checkpointing\): [\d.]+ GB per "
                     r"GPU, does NOT fit", text)  # why it is sharded: the smallest replicated ask
    assert re.search(r"full SFT \(FSDP2-sharded, local_batch_size \d+.*\): [\d.]+ GB per GPU, fits", text)
    assert "Distributed Checkpoint" in text
    train_config = yaml.safe_load(config_path(result, 2, result.chain.steps[1]).read_text())
    assert strategy_for(train_config.get("distributed", {}).get("strategy"), 8, lora=False) == "fsdp2"
    assert train_config["run"] == {"env": {"nprocs_per_node": 8}}
    cfg = compile_config(all_steps()["sft/automodel"], str(config_path(result, 2, result.chain.steps[1]))).validated
    check = memory.estimate_memory(cfg, result.facts.model.skeleton()[0], torch.device("cuda"))
    assert check.strategy == "fsdp2" and check.world_size == 8  # what `error[oom]` will check, per process
    assert abs(check.training * result.facts.model.skeleton()[1] - result.fit.total) < 0.02 * result.fit.total


def test_chain_type_check_rejects_a_wrong_edge():
    from chatft.plan.chain import Node, check_edge

    train = Node("T", "peft/automodel", step="peft/automodel")
    evaluate = Node("E", "eval/model_eval", step="eval/model_eval")
    check_edge(train, evaluate, "checkpoint_lora")
    with pytest.raises(ValueError, match="does not produce checkpoint_hf"):
        check_edge(train, evaluate, "checkpoint_hf")
    with pytest.raises(ValueError, match="does not consume chat_data"):
        check_edge(Node("D", "raw.json", type="chat_data"), train, "chat_data")


def test_seq_length_and_batch_options(tmp_path):
    result = plan(LLAMA_8B, gpus=8, seq_length=4096, local_batch_size=1)
    assert result.facts.seq_length == 4096 and result.fit.local_batch_size == 1
    rows = chat_jsonl(tmp_path / "long.jsonl", 20, words=1000)  # about 12k characters, 3k tokens a row
    assert plan(data=str(rows)).facts.seq_length == 4096


def test_cpu_plan_uses_float32_and_one_process(tiny_model_dir, tmp_path):
    result = plan(str(tiny_model_dir), gpus=0, gpu_memory_gb=8, out=str(tmp_path))
    train = next(s for s in result.chain.steps if s.role == "train")
    settings = step_settings(result, train)
    assert settings["model.torch_dtype"] == "float32" and "run.env.nprocs_per_node" not in settings


# --------------------------------------------------------------------------- the model: sources, estimates, refusals


def test_local_model_estimate_is_the_training_engines_own(tiny_model_dir):
    from chatft.config.schema import TrainingConfig
    from chatft.train import memory

    facts = resolve_model(str(tiny_model_dir))
    assert facts.source == "local" and facts.location == str(tiny_model_dir.resolve()) and not facts.assumptions
    skeleton = memory.meta_model(TrainingConfig.model_validate(
        {"model": {"pretrained_model_name_or_path": str(tiny_model_dir)}, "dataset": {"path_or_dataset_id": "x"}}))
    assert facts.params == sum(p.numel() for p in skeleton.parameters())
    for lora in (False, True):
        planned = estimate(facts, Layout(1, 1, 80 * GB), lora=lora, seq_length=256, local_batch_size=2)
        cfg = TrainingConfig.model_validate({
            "model": {"pretrained_model_name_or_path": str(tiny_model_dir), "torch_dtype": "bfloat16"},
            "dataset": {"path_or_dataset_id": "x", "seq_length": 256},
            "step_scheduler": {"global_batch_size": 2, "local_batch_size": 2}, "peft": "lora" if lora else None})
        engine = memory.estimate_memory(cfg, skeleton, torch.device("cuda"))
        assert abs(planned.total - engine.training) <= 1  # the allocator's slack is in both, rounded apart
    sharded = estimate(facts, Layout(4, 1, 80 * GB), lora=False, seq_length=256, local_batch_size=2)
    single = estimate(facts, Layout(1, 1, 80 * GB), lora=False, seq_length=256, local_batch_size=2)
    assert sharded.optimizer == single.optimizer // 4 and sharded.activations == single.activations
    cfg = TrainingConfig.model_validate({
        "model": {"pretrained_model_name_or_path": str(tiny_model_dir), "torch_dtype": "bfloat16"},
        "dataset": {"path_or_dataset_id": "x", "seq_length": 256},
        "step_scheduler": {"global_batch_size": 8, "local_batch_size": 2}, "run": {"env": {"nprocs_per_node": 4}}})
    engine = memory.estimate_memory(cfg, skeleton, torch.device("cuda"))  # 4 processes: auto shards full SFT
    assert engine.strategy == "fsdp2" and engine.world_size == 4 and engine.gathered > 0
    assert abs(sharded.total - engine.training) <= 1  # the plan's figure is the one training checks


def test_real_smollm2_dir_is_read_locally(smollm2_dir, tmp_path):
    result = plan(str(smollm2_dir), gpus=1, out=str(tmp_path))
    assert result.facts.model.source == "local" and 130e6 < result.facts.model.params < 140e6
    assert result.facts.model.model_type == "llama" and result.fit.fits


def test_hub_config_in_the_local_cache_is_used(tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "models--acme--tiny-chat"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", repo / "snapshots" / "abc123" / "config.json")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    facts = resolve_model("acme/tiny-chat")
    assert facts.source == "hf_cache" and facts.location == "acme/tiny-chat" and "cache" in facts.assumptions[0]


def test_known_ids_and_size_hints_say_what_was_assumed():
    known = resolve_model("Qwen/Qwen2.5-7B-Instruct")
    assert known.source == "known" and known.hidden == 3584 and "table of known models" in known.assumptions[0]
    assert abs(known.params - 7.62e9) < 1e6  # the published count, not the stand-in's
    hinted = resolve_model("someorg/mystery-13B-chat")
    assert hinted.source == "size_hint" and hinted.params == 13e9 and "size in its name" in hinted.assumptions[0]
    with pytest.raises(ChatftError) as err:
        resolve_model("someorg/mystery")
    assert err.value.id == "config_invalid" and "no network" in err.value.message


def test_custom_code_models_are_planned_with_a_note(tmp_path):
    config = {"model_type": "acme_lm", "auto_map": {"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"},
              "hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512, "vocab_size": 1000,
              "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    facts = resolve_model(str(tmp_path))
    assert facts.custom_code and "trust_remote_code=true" in facts.assumptions[0]


def test_models_chatft_cannot_load_are_refused_plainly(tmp_path):
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    megatron = tmp_path / "megatron"
    (megatron / "iter_0000100").mkdir(parents=True)
    (megatron / "latest_checkpointed_iteration.txt").write_text("100")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "empty").mkdir()
    cases = {str(vit): ("config_invalid", "not a causal LM"),
             str(megatron): ("route_not_supported", "Megatron checkpoint"),
             str(tmp_path / "model.gguf"): ("config_invalid", "GGUF"),
             str(tmp_path / "empty"): ("config_invalid", "no config.json"),
             str(tmp_path / "missing"): ("config_invalid", "does not exist")}
    for model, (error_id, words) in cases.items():
        with pytest.raises(ChatftError) as err:
            plan(model)
        assert err.value.id == error_id and words in err.value.message, model
    result = chatft("plan", "--gpus", "1", "--model", str(vit))
    assert "not a causal LM" in error_block(result, "config_invalid") and result.stdout == ""


def test_cli_plans_and_writes_plan_md(tmp_path, tiny_model_dir):
    result = chatft("plan", "--gpus", "1", "--gpu-memory-gb", "24", "--model", str(tiny_model_dir),
                    "--want", "adapter", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "HF-native: a LoRA adapter with `peft/automodel`" in result.stdout
    assert "peft/automodel --checkpoint_lora--> eval/model_eval (after)" in result.stdout
    assert re.search(r"LoRA \(one process, local_batch_size \d\): [\d.]+ GB per GPU, fits", result.stdout)
    assert (tmp_path / "out" / "plan.md").is_file() and (tmp_path / "out" / "2-peft.yaml").is_file()
    bad = chatft("plan", "--gpus", "1", "--model", SMOL, "--want", "everything", cwd=tmp_path)
    assert "--want everything" in error_block(bad, "config_invalid")


def test_tool_call_data_is_counted_as_data_prep_keeps_it(tmp_path):
    """The planner converts rows as prep does (tool-call shapes mapped, the text before a call merged with it), so
    its clean rows are prep's rows and their lengths count the calls."""
    call = {"from": "function_call", "value": json.dumps({"name": "water_needs", "arguments": {"plant": "fern"}})}
    rows = [{"conversations": [{"from": "human", "value": "How often should I water a fern?"},
                               {"from": "gpt", "value": "Let me check."}, call,
                               {"from": "observation", "value": '{"days": 3}'},
                               {"from": "gpt", "value": "Every three days."}]}] * 3
    rows.append({"conversations": [{"from": "human", "value": "Hi"}, {"from": "observation", "value": "{}"}]})
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prepped = chatft("prep", str(raw), "-o", str(tmp_path / "out.jsonl"), cwd=tmp_path)
    assert prepped.returncode == 0, prepped.stderr
    report = json.loads((tmp_path / "prep_report.json").read_text())
    data = plan(data=str(raw), out=str(tmp_path / "plan")).facts.data
    assert data.rows_clean == report["rows_out"] == 3 and sum(data.dropped.values()) == 1
    assert data.token_quantiles["max"] > 10 + len(call["value"]) // 4  # the call's arguments are counted
