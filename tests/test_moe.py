"""Mixture-of-experts models train: tiny random Qwen3-MoE- and Mixtral-shaped checkpoints (`tiny_models`) run full
SFT and LoRA through the real CLI, their artifacts load with plain transformers / peft and give the loss chatft
measured, LoRA says which weights it adapts (attention by default; every expert's weights when named, through PEFT's
`target_parameters`; never the router unless named), the LoRA adapter merges, the memory estimate counts every
expert and FLOPs only the top-k a token runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clirun import run_chatft
from conftest import REPO_ROOT, load_module_from_path

from chatft.config.schema import LoraSection
from chatft.errors import ChatftError
from chatft.train.model import apply_lora, count_parameters, expert_parameter_names, lora_targets

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")
flops = load_module_from_path("chatft_bench_flops", REPO_ROOT / "bench" / "flops.py")

ARCHITECTURES = ("qwen3_moe", "mixtral")
NUM_EXPERTS, TOP_K = 4, 2  # tiny_models' MoE shapes
WORDS = "apple river stone cloud ember frost grove harbor island jungle kettle lantern meadow nectar orchard pepper"
ROWS = [{"messages": [{"role": "user", "content": f"Spell {word} backwards, then count to {i % 6}."},
                      {"role": "assistant", "content": f"{word[::-1]}. " + " ".join(str(n) for n in range(i % 6 + 1))}]}
        for i, word in enumerate(WORDS.split())]
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def moe_dir(request) -> Path:
    return request.getfixturevalue({"qwen3_moe": "tiny_qwen3_moe_dir", "mixtral": "tiny_mixtral_dir"}[request.param])


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def trainable_names(model) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


# --------------------------------------------------------------------------- the fixtures


def test_tiny_moe_checkpoints_hold_stacked_experts_and_a_router(moe_dir):
    model = load(moe_dir)
    experts = expert_parameter_names(model)
    params = dict(model.named_parameters())
    assert experts and {name.rsplit(".", 1)[-1] for name in experts} == {"gate_up_proj", "down_proj"}
    assert all(params[name].ndim == 3 and params[name].shape[0] == NUM_EXPERTS for name in experts)
    assert model.config.num_experts_per_tok == TOP_K
    router = model.get_submodule(experts[0].rsplit(".", 2)[0] + ".gate")
    assert not isinstance(router, torch.nn.Linear) and router.weight.shape == (NUM_EXPERTS, model.config.hidden_size)
    # Qwen3-MoE's layer 1 is a dense MLP (mlp_only_layers), so the experts of one layer only; Mixtral's in both.
    moe_layers = {name.split(".")[2] for name in experts}
    assert moe_layers == ({"0"} if model.config.model_type == "qwen3_moe" else {"0", "1"})


# --------------------------------------------------------------------------- LoRA targets


def test_all_linear_lora_adapts_attention_and_leaves_experts_and_router_frozen(moe_dir):
    model = load(moe_dir)
    targets = lora_targets(model, LoraSection())
    assert {name.rsplit(".", 1)[-1] for name in targets.modules} == ATTENTION
    assert targets.expert_parameters == [] and targets.frozen_experts == expert_parameter_names(model)
    line = targets.describe()
    assert "experts.gate_up_proj" in line and "stay frozen" in line and "router stays frozen" in line
    if model.config.model_type == "qwen3_moe":
        # Layer 1's dense MLP is linear, but PEFT reads gate_proj/up_proj/down_proj on a Qwen3-MoE as the experts
        # (its transformers-4 compatibility): an adapter on them would not load back as trained, so they are left
        # out, and said so.
        assert targets.left_out == [f"model.layers.1.mlp.{kind}" for kind in ("gate_proj", "up_proj", "down_proj")]
        assert "are left out: PEFT reads these names as the experts" in line

    wrapped = apply_lora(model, LoraSection(dim=4, alpha=8), seed=0)
    trained = trainable_names(wrapped)
    assert trained and all("lora_" in name for name in trained)
    assert not any(".experts." in name or ".mlp.gate." in name for name in trained)


def test_naming_the_experts_adapts_every_expert_through_peft_target_parameters(tiny_mixtral_dir):
    model = load(tiny_mixtral_dir)
    section = LoraSection(dim=4, alpha=8, dropout=0, target_modules=["q_proj", "experts"])
    targets = lora_targets(model, section)
    assert targets.expert_parameters == expert_parameter_names(model) and targets.frozen_experts == []
    assert "expert weights experts.down_proj, experts.gate_up_proj (every expert" in targets.describe()
    wrapped = apply_lora(model, section, seed=0)
    assert sorted(wrapped.peft_config["default"].target_parameters) == ["experts.down_proj", "experts.gate_up_proj"]
    # One rank-4 pair per expert on each stacked weight: (experts x r) rows of A.
    expert_a = [p for n, p in wrapped.named_parameters() if ".experts." in n and "lora_A" in n]
    assert len(expert_a) == 2 * 2 and all(p.shape[0] == NUM_EXPERTS * 4 for p in expert_a)
    # The adapters are on the path of the loss: B starts at zero, so it is B that receives gradient first.
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    expert_b = [p for n, p in wrapped.named_parameters() if ".experts." in n and "lora_B" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert_b)


def test_expert_weights_without_dropout_only(tiny_mixtral_dir):
    model = load(tiny_mixtral_dir)
    with pytest.raises(ChatftError) as refused:
        lora_targets(model, LoraSection(dropout=0.05, target_modules=["q_proj", "gate_up_proj"]))
    assert refused.value.id == "config_invalid" and "peft.dropout=0" in refused.value.hint


def test_unknown_target_names_the_expert_weights_in_its_hint(tiny_mixtral_dir):
    with pytest.raises(ChatftError) as refused:
        lora_targets(load(tiny_mixtral_dir), LoraSection(target_modules=["w1"]))
    assert "experts.gate_up_proj" in refused.value.hint and "q_proj" in refused.value.hint


def test_linear_routers_are_left_out_of_all_linear_unless_named():
    """Qwen2-MoE's `shared_expert_gate` is an nn.Linear beside the experts: all-linear skips it, naming takes it."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, num_experts=4, num_experts_per_tok=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = lora_targets(model, LoraSection())
    assert "model.layers.0.mlp.shared_expert_gate" not in targets.modules
    # the shared expert is a dense MLP, and PEFT does not rewrite Qwen2-MoE's names (it does Qwen3-MoE's): adapted
    assert "model.layers.0.mlp.shared_expert.gate_proj" in targets.modules and targets.left_out == []
    named = lora_targets(model, LoraSection(target_modules=["shared_expert_gate"])).modules
    assert named == ["model.layers.0.mlp.shared_expert_gate"]


# --------------------------------------------------------------------------- memory, FLOPs, plan


def expert_weights_by_hand(config, moe_layers: int, experts: int) -> int:
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return moe_layers * experts * 3 * width * config.hidden_size  # gate, up (fused) and down, each hidden x width


def test_memory_estimate_counts_every_expert(moe_dir, tmp_path):
    from chatft.train.memory import estimate_memory

    model = load(moe_dir)
    real = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if n in expert_parameter_names(model))
    moe_layers = 1 if model.config.model_type == "qwen3_moe" else 2
    assert experts == expert_weights_by_hand(model.config, moe_layers, NUM_EXPERTS)
    cpu = torch.device("cpu")
    full = estimate_memory(helpers.training_config(moe_dir, tmp_path), device=cpu)
    assert full.weights == full.gradients == real * 4  # float32: every expert's weights, trained
    assert full.optimizer == 2 * real * 4

    lora = helpers.training_config(moe_dir, tmp_path, lora=True, peft__target_modules=["q_proj", "experts"],
                                   peft__match_all_linear=False)
    estimate = estimate_memory(lora, device=cpu)
    wrapped = apply_lora(load(moe_dir), lora.peft, seed=0)
    assert estimate.gradients == count_parameters(wrapped).trainable * 4  # PEFT's own count of the adapters


def test_flops_count_only_the_active_experts(moe_dir):
    """N is the parameters a token runs through: the same model with only top-k experts has them all (its router is
    smaller by the (n - k) rows it no longer scores, which the n-expert model's router still computes)."""
    from transformers import AutoConfig

    counts = flops.count_model(moe_dir, lora=False, lora_r=0, lora_targets=[])
    model = load(moe_dir)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    moe_layers = 1 if model.config.model_type == "qwen3_moe" else 2
    idle = expert_weights_by_hand(model.config, moe_layers, NUM_EXPERTS - TOP_K)
    assert counts.idle_experts_excluded == idle and counts.params == total - embedding - idle

    config = AutoConfig.from_pretrained(moe_dir)
    experts_key = "num_experts" if config.model_type == "qwen3_moe" else "num_local_experts"
    setattr(config, experts_key, TOP_K)
    with torch.device("meta"):
        only_active = type(model)(config)
    router_rows = moe_layers * (NUM_EXPERTS - TOP_K) * config.hidden_size
    assert counts.params == sum(p.numel() for p in only_active.parameters()) - embedding + router_rows
    assert "mixture of experts" in counts.formula(lora=False)

    lora = flops.count_model(moe_dir, lora=True, lora_r=4, lora_targets=["q_proj", "gate_up_proj", "down_proj"])
    hidden, width = config.hidden_size, getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    # Qwen3-MoE's dense layer 1 has a linear down_proj, which the same short name adapts
    dense_down = 4 * (config.intermediate_size + hidden) if config.model_type == "qwen3_moe" else 0
    q_proj = 2 * 4 * (hidden + hidden)
    experts_active = moe_layers * TOP_K * 4 * ((hidden + 2 * width) + (width + hidden))
    assert lora.lora_params == q_proj + dense_down + experts_active


def test_planner_tells_total_from_active_parameters(tiny_mixtral_dir):
    from chatft.plan.models import resolve_model

    facts = resolve_model(str(tiny_mixtral_dir))
    model = load(tiny_mixtral_dir)
    assert facts.moe and facts.params == sum(p.numel() for p in model.parameters())
    assert facts.active_params == facts.params - expert_weights_by_hand(model.config, 2, NUM_EXPERTS - TOP_K)
    assert f"of which {facts.active_params / 1e9:,.2f}B active per token" in facts.shape_line()
    known = resolve_model("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert known.moe and known.params > 3 * known.active_params  # 8 experts, 2 per token
    assert "active per token" in known.shape_line()


# --------------------------------------------------------------------------- through the CLI

# LoRA per architecture: Qwen3-MoE with the default targets (attention and the dense MLP; experts frozen), Mixtral
# with the experts named (and no dropout, which PEFT cannot apply to stacked expert weights).
LORA_TARGETS = {"qwen3_moe": (), "mixtral": ("peft.match_all_linear=false",
                                             "peft.target_modules=[q_proj,k_proj,v_proj,o_proj,experts]",
                                             "peft.dropout=0")}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("moe")
    (directory / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (directory / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[:4]))
    return directory


@pytest.fixture(scope="module")
def cli_runs(work):
    """Runs made once per (model, kind) and shared by the tests that read them."""
    done: dict[tuple[Path, str], tuple[Path, str]] = {}

    def run(model: Path, kind: str) -> tuple[Path, str]:
        if (model, kind) not in done:
            name = f"{model.name}-{kind}"
            # Full SFT on CPU checkpoints activations selectively by default (`auto`); "full-kept" keeps them all.
            step, extra = {"full": ("sft/automodel", ("optimizer.lr=3e-3",)),
                           "full-kept": ("sft/automodel", ("optimizer.lr=3e-3",
                                                           "distributed.activation_checkpointing=false")),
                           "lora": ("peft/automodel", ("optimizer.lr=1e-2", *LORA_TARGETS[load_config_type(model)]))
                           }[kind]
            result = run_chatft(
                "run", step, "-c", "tiny", f"model.pretrained_model_name_or_path={model}",
                "dataset.path_or_dataset_id=train.jsonl", "validation_dataset.path_or_dataset_id=val.jsonl",
                f"checkpoint.checkpoint_dir={name}", "step_scheduler.global_batch_size=4",
                "step_scheduler.local_batch_size=2", "step_scheduler.max_steps=6", "step_scheduler.num_epochs=2",
                "step_scheduler.val_every_steps=null", "step_scheduler.ckpt_every_steps=null",
                "lr_scheduler.lr_warmup_steps=0", *extra, cwd=work)
            assert result.returncode == 0, result.stdout + result.stderr
            done[(model, kind)] = (work / name, result.stdout)
        return done[(model, kind)]

    return run


def load_config_type(model_dir: Path) -> str:
    return json.loads((model_dir / "config.json").read_text())["model_type"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def validation_loss(model, model_dir: Path, work: Path) -> float:
    """The loss of `model` on val.jsonl, tokenized and masked as training does, scored outside the trainer."""
    from chatft.data.pipeline import prepare_training_data
    from chatft.train import batching
    from chatft.train.losses import score_batches
    from chatft.train.model import load_tokenizer

    cfg = helpers.training_config(model_dir, work, dataset__path_or_dataset_id=str(work / "val.jsonl"))
    tokenizer = load_tokenizer(cfg.model)
    rows = prepare_training_data(cfg.dataset, tokenizer, use_cache=False, log=lambda line: None).rows
    return score_batches(model, batching.micro_batches(rows, 2, tokenizer.pad_token_id), torch.device("cpu")).loss


def manifest_val_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "final" / "chatft_manifest.json").read_text())["metrics"]["val_loss"]


def stacked(model) -> dict[str, torch.Tensor]:
    """The stacked expert weights and the router weights of `model`, by name."""
    routers = [name.rsplit(".", 2)[0] + ".gate.weight" for name in expert_parameter_names(model)]
    params = dict(model.named_parameters())
    return {name: params[name].detach() for name in [*expert_parameter_names(model), *routers]}


def test_full_sft_trains_every_expert_and_the_artifact_loads_with_transformers(moe_dir, cli_runs, work):
    run_dir, _ = cli_runs(moe_dir, "full")
    curve = losses(run_dir)
    assert len(curve) == 6 and curve[-1] < curve[0] - 0.3, curve
    trained = load(run_dir / "final")
    assert type(trained).__name__ == type(load(moe_dir)).__name__
    # The saved weights are chatft's final ones: the validation loss the run measured at its end.
    assert validation_loss(trained, moe_dir, work) == pytest.approx(manifest_val_loss(run_dir), rel=1e-5)
    before, after = stacked(load(moe_dir)), stacked(trained)
    for name, weight in before.items():  # every expert of every MoE layer, and each router, moved
        changed = (after[name] - weight).flatten(1).abs().amax(dim=1) if ".experts." in name else \
            (after[name] - weight).abs().amax().reshape(1)
        assert bool((changed > 0).all()), name


def test_lora_trains_moe_and_the_adapter_loads_on_the_plain_base(moe_dir, cli_runs, work):
    from peft import PeftModel

    run_dir, stdout = cli_runs(moe_dir, "lora")
    curve = losses(run_dir)
    assert len(curve) == 6 and curve[-1] < curve[0] - 0.2, curve
    adapter_config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    experts_named = load_config_type(moe_dir) == "mixtral"
    assert "LoRA on a mixture-of-experts model: adapts linear layers" in stdout
    manifest = json.loads((run_dir / "final" / "chatft_manifest.json").read_text())
    if experts_named:
        assert sorted(adapter_config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
        assert manifest["lora"]["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
        assert "the router stays frozen" in stdout and "stay frozen" not in stdout
    else:
        assert not adapter_config.get("target_parameters")
        assert "the expert weights experts.down_proj, experts.gate_up_proj stay frozen" in stdout
    adapted = PeftModel.from_pretrained(load(moe_dir), run_dir / "final").eval()
    assert validation_loss(adapted, moe_dir, work) == pytest.approx(manifest_val_loss(run_dir), rel=1e-5)


def merge(work: Path, run_dir: Path, out: str, *extra: str) -> Path:
    result = run_chatft("run", "convert/merge_lora", f"lora_checkpoint={run_dir}", f"output_hf_path={out}", *extra,
                        cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    return work / out


def test_attention_only_adapter_merges_and_keeps_the_experts(tiny_qwen3_moe_dir, cli_runs, work):
    run_dir, _ = cli_runs(tiny_qwen3_moe_dir, "lora")
    merged = load(merge(work, run_dir, "qwen3-merged"))
    base = load(tiny_qwen3_moe_dir)
    assert all(torch.equal(stacked(merged)[name], weight) for name, weight in stacked(base).items())
    assert validation_loss(merged, tiny_qwen3_moe_dir, work) == pytest.approx(manifest_val_loss(run_dir), rel=1e-5)


def test_expert_adapter_merges_into_every_expert(tiny_mixtral_dir, cli_runs, work):
    run_dir, _ = cli_runs(tiny_mixtral_dir, "lora")
    merged = load(merge(work, run_dir, "mixtral-merged"))  # strict: every expert factor fits its stacked weight
    base = stacked(load(tiny_mixtral_dir))
    for name, weight in stacked(merged).items():
        if ".experts." in name:
            assert bool(((weight - base[name]).flatten(1).abs().amax(dim=1) > 0).all()), name
        else:
            assert torch.equal(weight, base[name])  # the router was not adapted
    assert validation_loss(merged, tiny_mixtral_dir, work) == pytest.approx(manifest_val_loss(run_dir), rel=1e-5)


def test_an_expert_adapter_does_not_fit_experts_of_another_width(tiny_mixtral_dir, cli_runs, tmp_path):
    """The fit check reads PEFT's nested expert factors: a base whose experts are narrower is refused by name."""
    from chatft.adapter_fit import check_adapter_fits
    from transformers import AutoConfig, AutoModelForCausalLM

    run_dir, _ = cli_runs(tiny_mixtral_dir, "lora")
    assert check_adapter_fits(load(tiny_mixtral_dir), run_dir / "final", strict=True) == []
    config = AutoConfig.from_pretrained(tiny_mixtral_dir)
    config.intermediate_size //= 2
    with pytest.raises(ChatftError) as refused:
        check_adapter_fits(AutoModelForCausalLM.from_config(config), run_dir / "final", strict=True)
    assert refused.value.id == "base_model_mismatch" and "expert factors" in refused.value.message


def test_selective_checkpointing_of_moe_full_sft_trains_what_keeping_every_activation_trains(tiny_mixtral_dir,
                                                                                              cli_runs):
    """The default on CPU (`auto`: selective) keeps the matmul outputs only, so it recomputes the routing, whose
    outputs transformers' MoE blocks change in place (a kept one would stop the run at the first step)."""
    selective, stdout = cli_runs(tiny_mixtral_dir, "full")
    kept, _ = cli_runs(tiny_mixtral_dir, "full-kept")
    assert "activation checkpointing: selective" in stdout
    assert losses(selective) == pytest.approx(losses(kept), abs=1e-5)
