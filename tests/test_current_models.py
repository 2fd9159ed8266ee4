"""Models released since early 2025 in the bundled registry, and mixture-of-experts adapters on fused expert weights.

The registry's figures come from each model's published config.json (see the `source` of every entry); the
parameter counts below were measured with a meta-device build of those figures. The MoE tests shrink a real
architecture (tiny_overrides keeps its module layout and fused 3-D expert weights), give it LoRA on the experts
through PEFT's `target_parameters`, and compare PEFT's own trainable count with the estimator's trace.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from peftpick.cli import app
from peftpick.errors import PeftpickError
from peftpick.knowledge.architectures import build_config, count_parameters, load_registry, resolve_model, tiny_overrides
from peftpick.knowledge.targets import expert_parameters, resolve_targets
from peftpick.methods import build_candidate
from peftpick.report.formatting import count

NEW_MODELS = (
    "gpt-oss-20b", "gpt-oss-120b", "smollm3-3b", "qwen3-4b-instruct-2507", "qwen3-4b-thinking-2507",
    "qwen3-30b-a3b-instruct-2507", "qwen3-30b-a3b-thinking-2507", "qwen3-235b-a22b",
    "qwen3-235b-a22b-instruct-2507", "qwen3-235b-a22b-thinking-2507", "phi-4-mini", "phi-4-mini-reasoning",
    "phi-4-reasoning", "phi-4-reasoning-plus", "mistral-small-3.2-24b", "llama-4-scout-17b-16e",
)

FIGURES = ("model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
           "vocab_size", "tie_word_embeddings", "num_experts", "experts_per_token")


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _tiny(name: str, num_layers: int = 2):
    """A few-thousand-parameter copy of a bundled architecture, as a transformers config and its Architecture."""
    big = resolve_model(name)
    config = build_config(big, **tiny_overrides(big, num_layers=num_layers))
    return config, resolve_model(config)


# ------------------------------------------------------------------------------------------------ registry


def test_the_new_models_are_listed_by_peftpick_models(registry):
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    listed = {entry["name"]: entry for entry in json.loads(result.output)}
    assert set(NEW_MODELS) <= set(listed)
    assert listed["gpt-oss-20b"]["hub_id"] == "openai/gpt-oss-20b"
    assert listed["gpt-oss-120b"]["published_params"] == 117_000_000_000
    for name in NEW_MODELS:
        entry = registry.lookup(name)
        assert entry.source_url == f"https://huggingface.co/{entry.hub_id}/blob/main/config.json"
        assert len(entry.source_checked) > 60, name  # names the copies of the config.json the figures came from


def test_the_models_table_reads_gemma_3_1b_as_1_0_b():
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.strip().startswith("gemma-3-1b "))
    assert "1.0 B" in row and "e+" not in result.output
    assert "20.9 B" in next(line for line in result.output.splitlines() if line.strip().startswith("gpt-oss-20b "))


@pytest.mark.parametrize(
    ("name", "figures"),
    [
        ("gpt-oss-20b", ("gpt_oss", 2880, 24, 64, 8, 64, 2880, 201088, False, 32, 4)),
        ("gpt-oss-120b", ("gpt_oss", 2880, 36, 64, 8, 64, 2880, 201088, False, 128, 4)),
        ("smollm3-3b", ("smollm3", 2048, 36, 16, 4, 128, 11008, 128256, True, 0, 0)),
        ("qwen3-4b-instruct-2507", ("qwen3", 2560, 36, 32, 8, 128, 9728, 151936, True, 0, 0)),
        ("qwen3-30b-a3b-instruct-2507", ("qwen3_moe", 2048, 48, 32, 4, 128, 768, 151936, False, 128, 8)),
        ("qwen3-235b-a22b-instruct-2507", ("qwen3_moe", 4096, 94, 64, 4, 128, 1536, 151936, False, 128, 8)),
        ("phi-4-mini", ("phi3", 3072, 32, 24, 8, 128, 8192, 200064, True, 0, 0)),
        ("phi-4-reasoning", ("phi3", 5120, 40, 40, 10, 128, 17920, 100352, False, 0, 0)),
        ("mistral-small-3.2-24b", ("mistral", 5120, 40, 32, 8, 128, 32768, 131072, False, 0, 0)),
        ("llama-4-scout-17b-16e", ("llama4_text", 5120, 48, 40, 8, 128, 8192, 202048, False, 16, 1)),
    ],
)
def test_figures_of_the_new_models(registry, name, figures):
    arch = resolve_model(name, registry)
    assert tuple(getattr(arch, figure) for figure in FIGURES) == figures


def test_context_lengths_and_layer_patterns_come_from_the_configs(registry):
    from peftpick.knowledge.architectures import context_length

    assert context_length(resolve_model("qwen3-4b-instruct-2507", registry)) == 262144
    assert context_length(resolve_model("smollm3-3b", registry)) == 65536
    assert context_length(resolve_model("llama-4-scout-17b-16e", registry)) == 10485760
    gpt_oss = resolve_model("gpt-oss-120b", registry)
    assert gpt_oss.config["layer_types"] == ["sliding_attention", "full_attention"] * 18
    assert gpt_oss.config["sliding_window"] == 128
    smollm3 = resolve_model("smollm3-3b", registry)
    assert smollm3.config["no_rope_layers"] == [1, 1, 1, 0] * 9  # every fourth layer uses RoPE
    assert resolve_model("phi-4-mini", registry).config["partial_rotary_factor"] == 0.75
    # the Mistral Small 3.1 spelling finds the same text decoder
    assert resolve_model("Mistral-Small-3.1-24B-Instruct-2503", registry).name == "mistral-small-3.2-24b"


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("gpt-oss-20b", 20_914_757_184),  # published: 21B (20.9B)
        ("gpt-oss-120b", 116_829_156_672),  # published: 117B
        ("qwen3-4b-instruct-2507", 4_022_468_096),  # published: 4.02B
        ("llama-4-scout-17b-16e", 107_769_861_120),  # text decoder only; 109B with the vision encoder
        ("mistral-small-3.2-24b", 23_572_403_200),  # published: 24B
    ],
)
def test_meta_build_parameter_counts(registry, name, params):
    assert count_parameters(resolve_model(name, registry)) == params


def test_published_counts_that_were_missing_are_filled(registry):
    assert registry.lookup("gemma-2-9b").published_params == 9_241_705_984
    assert registry.lookup("gemma-2-27b").published_params == 27_227_128_320
    assert registry.lookup("qwen3-0.6b").published_params == 600_000_000
    for name in ("gemma-2-9b", "gemma-2-27b", "qwen3-0.6b", "qwen3-4b", "phi-4-mini", "qwen3-30b-a3b-instruct-2507"):
        entry = registry.lookup(name)
        built = count_parameters(resolve_model(name, registry))
        assert abs(built - entry.published_params) / entry.published_params < 0.02, (name, built)


# ------------------------------------------------------------------------------------------------ formatting


@pytest.mark.parametrize(
    ("n", "text"),
    [(999_885_952, "1.0 B"), (1_000_000_000, "1.0 B"), (1_235_814_400, "1.24 B"), (4_590_000, "4.59 M"),
     (999_499, "999 k"), (999_500, "1.0 M"), (134_500_000, "134 M"), (20_914_757_184, "20.9 B"),
     (116_829_156_672, "117 B"), (512, "512"), (None, "n/a")],
)
def test_parameter_counts_are_rounded_before_the_unit_is_chosen(n, text):
    assert count(n) == text


# ------------------------------------------------------------------------------------------------ MoE experts


def test_fused_expert_weights_and_their_roles():
    _, gpt_oss = _tiny("gpt-oss-20b")
    found = {p.path: (p.roles, p.shape) for p in expert_parameters(gpt_oss)}
    # tiny: hidden 64, 4 experts, intermediate 2 x 64; gpt-oss fuses gate and up and keeps (experts, in, out)
    assert found == {"mlp.experts.gate_up_proj": (("gate", "up"), (4, 64, 256)),
                     "mlp.experts.down_proj": (("down",), (4, 128, 64))}
    _, scout = _tiny("llama-4-scout-17b-16e")
    assert [p.path for p in expert_parameters(scout)] == ["feed_forward.experts.gate_up_proj",
                                                         "feed_forward.experts.down_proj"]
    assert expert_parameters(resolve_model("phi-4-mini")) == []


def test_resolve_targets_reaches_experts_only_when_asked():
    _, arch = _tiny("qwen3-30b-a3b-instruct-2507")
    with pytest.raises(PeftpickError, match="cannot target mlp on qwen3_moe"):
        resolve_targets(arch, "mlp")
    mlp = resolve_targets(arch, "mlp", method="LoRA", experts=True)
    assert mlp.modules == [] and mlp.parameters == ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    assert mlp.roles_covered == ("gate", "up", "down")
    down = resolve_targets(arch, ["down"], method="LoRA", experts=True)
    assert down.parameters == ("mlp.experts.down_proj",)
    gate = resolve_targets(arch, ["gate"], method="LoRA", experts=True)
    assert gate.roles_covered == ("gate", "up")
    assert any("covers up too" in note for note in gate.notes)
    everything = resolve_targets(arch, "all-linear", method="LoRA", experts=True)
    assert everything.modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert everything.parameters == ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _expert_lora_count(arch, rank: int) -> int:
    """PEFT's ParamWrapper on an (experts, a, b) weight: lora_A (a -> r x experts), lora_B (r x experts -> b)."""
    per_layer = sum(rank * shape[0] * (shape[1] + shape[2]) for shape in (p.shape for p in expert_parameters(arch)))
    return per_layer * arch.num_layers


@pytest.mark.parametrize("name", ["gpt-oss-20b", "qwen3-30b-a3b-instruct-2507"])
def test_expert_lora_trains_and_its_count_matches_the_estimate(name):
    import peftpick
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config, arch = _tiny(name)
    candidate = build_candidate("lora", arch, targets=["mlp"])
    assert candidate.peft_kwargs["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert candidate.peft_kwargs["target_modules"] == []
    assert any("PEFT target_parameters" in note for note in candidate.notes)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
    peft_model = get_peft_model(model, candidate.peft_config())
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert trainable == _expert_lora_count(arch, candidate.rank)
    ids = torch.randint(0, arch.vocab_size, (2, 8))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)

    estimate = peftpick.estimate(config, candidate.peft_config(), batch_size=1, seq_len=16)
    assert (estimate.trainable_params, estimate.total_params) == (trainable, total)


def test_all_linear_lora_on_gpt_oss_counts_attention_and_experts():
    import peftpick
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config, arch = _tiny("gpt-oss-20b")
    candidate = build_candidate("rslora", arch, targets=["all-linear"])
    assert sorted(candidate.peft_kwargs["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
    trainable, _ = get_peft_model(model, candidate.peft_config()).get_nb_trainable_parameters()
    assert trainable > _expert_lora_count(arch, candidate.rank)  # experts plus the attention projections
    assert peftpick.estimate(config, candidate.peft_config(), batch_size=1, seq_len=16).trainable_params == trainable


def test_methods_that_cannot_wrap_expert_parameters_fall_back_and_say_why():
    _, arch = _tiny("gpt-oss-20b")
    for method, why in (("dora", "use_dora=True"), ("pissa", "pissa initialisation"), ("olora", "olora"),
                        ("loha", "no target_parameters")):
        candidate = build_candidate(method, arch, targets=["attn", "mlp"])
        assert "target_parameters" not in candidate.peft_kwargs, method
        assert sorted(candidate.peft_kwargs["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        assert any(why in note and "cannot reach them" in note for note in candidate.notes), method
    with pytest.raises(PeftpickError, match="DoRA cannot target mlp"):
        build_candidate("dora", arch, targets=["mlp"])
    ia3 = build_candidate("ia3", arch)  # its run targets attention and MLP: attention only here
    assert "target_parameters" not in ia3.peft_kwargs
    assert any("IA3 cannot reach them" in note for note in ia3.notes)
    for method in ("rslora", "lora-fa"):
        assert build_candidate(method, arch, targets=["mlp"]).peft_kwargs["target_parameters"]


def test_default_lora_on_moe_keeps_the_runs_attention_targets_and_says_how_to_reach_experts():
    _, arch = _tiny("gpt-oss-20b")
    candidate = build_candidate("lora", arch)
    assert candidate.peft_kwargs["target_modules"] == ["q_proj", "v_proj"]
    assert "target_parameters" not in candidate.peft_kwargs
    assert any("experts per layer stay frozen" in note for note in candidate.notes)
    dense = build_candidate("lora", resolve_model("phi-4-mini"))
    assert not any("experts" in note for note in dense.notes)
