"""Gemma 3n and Gemma 4 text decoders in the bundled registry.

Their figures come from the transformers converters that wrote the hub checkpoints and the configuration defaults
of transformers 5.24.0 (see each entry's `source`). Their layers are not all alike: Gemma 3n states its FFN width
once per layer (a list-valued `intermediate_size`) and keeps only the top activations of its first layers; Gemma 3n
and Gemma 4 E2B / E4B end in layers that reuse earlier keys and values (no k_proj / v_proj there); Gemma 4 gives its
full-attention layers wider heads and, on the larger models, fewer KV heads whose values are their keys (no v_proj),
through transformers' `per_layer_config`. The tests shrink each model with `tiny_overrides`, keeping that layout,
and check LoRA's trainable count in the estimator's trace against PEFT's own count on the real module tree.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from peftpick.cli import app
from peftpick.knowledge.architectures import (
    architecture_from_config,
    build_config,
    build_model,
    check_config_figures,
    context_length,
    count_parameters,
    layer_differences,
    load_registry,
    resolve_model,
    tiny_overrides,
)
from peftpick.knowledge.targets import decoder_layer_modules, expert_parameters
from peftpick.methods import build_candidate

GEMMA_MODELS = ("gemma-3n-e2b", "gemma-3n-e4b", "gemma-4-e2b", "gemma-4-e4b", "gemma-4-26b-a4b", "gemma-4-31b",
                "gemma-4-12b")

FIGURES = ("model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
           "vocab_size", "tie_word_embeddings", "num_experts", "experts_per_token")

SLIDING, FULL = "sliding_attention", "full_attention"


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _tiny(name: str, num_layers: int, **extra):
    """A few-thousand-parameter copy of a bundled architecture, as a transformers config and its Architecture."""
    big = resolve_model(name)
    config = build_config(big, **{**tiny_overrides(big, num_layers=num_layers), **extra})
    return config, resolve_model(config)


# ------------------------------------------------------------------------------------------------ registry


# What `peftpick models` shows: the count published for the text decoder that peftpick plans (the registry's rule:
# within 2% of its meta-device build), "-" where none is; the whole checkpoint's raw / effective counts are in the
# display name and in published_params_source.
PUBLISHED = {
    "gemma-3n-e2b": (4_460_000_000, "4.46 B", "5B raw / 2B effective"),
    "gemma-3n-e4b": (6_900_000_000, "6.9 B", "8B raw / 4B effective"),
    "gemma-4-e2b": (None, "-", "5.1B / 2.3B effective"),
    "gemma-4-e4b": (None, "-", "7.9B / 4.5B effective"),
    "gemma-4-26b-a4b": (25_200_000_000, "25.2 B", "3.8B active"),
    "gemma-4-31b": (30_700_000_000, "30.7 B", "text decoder"),
    "gemma-4-12b": (11_950_000_000, "12 B", "text decoder"),
}


def test_the_gemma_models_are_listed_with_their_published_counts(registry):
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    listed = {entry["name"]: entry for entry in json.loads(result.output)}
    for name, (params, _, display) in PUBLISHED.items():
        assert listed[name]["published_params"] == params, name
        assert display in listed[name]["display_name"], name
        entry = registry.lookup(name)
        assert entry.source_url == f"https://huggingface.co/{entry.hub_id}/blob/main/config.json", name
        # where the figures were taken from: the transformers converter at a commit, and its defaults in 5.24.0
        assert "https://github.com/huggingface/transformers/blob/" in entry.source_checked, name
        assert "5.24.0" in entry.source_checked and "not read directly" in entry.source_checked, name
        assert "text decoder built here has" in entry.published_params_source, name
        assert entry.notes and "text decoder" in entry.notes, name
    table = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    rows = {line.split()[0]: line for line in table.output.splitlines() if line.strip().startswith("gemma-")}
    for name, (_, shown, _) in PUBLISHED.items():
        assert f" {shown} " in rows[name], rows[name]


@pytest.mark.parametrize(
    ("spelling", "name"),
    [("google/gemma-3n-E2B-it", "gemma-3n-e2b"), ("gemma-3n-E4B", "gemma-3n-e4b"),
     ("google/gemma-4-E2B", "gemma-4-e2b"), ("gemma-4-26B-A4B-it", "gemma-4-26b-a4b"),
     ("google/gemma-4-31B-it", "gemma-4-31b"), ("gemma-4-12B", "gemma-4-12b")],
)
def test_hub_spellings_find_the_entries(registry, spelling, name):
    assert registry.lookup(spelling).name == name


@pytest.mark.parametrize(
    ("name", "figures"),
    [
        ("gemma-3n-e2b", ("gemma3n_text", 2048, 30, 8, 2, 256, 8192, 262400, True, 0, 0)),
        ("gemma-3n-e4b", ("gemma3n_text", 2048, 35, 8, 2, 256, 16384, 262400, True, 0, 0)),
        ("gemma-4-e2b", ("gemma4_text", 1536, 35, 8, 1, 256, 6144, 262144, True, 0, 0)),
        ("gemma-4-e4b", ("gemma4_text", 2560, 42, 8, 2, 256, 10240, 262144, True, 0, 0)),
        ("gemma-4-26b-a4b", ("gemma4_text", 2816, 30, 16, 8, 256, 704, 262144, True, 128, 8)),
        ("gemma-4-31b", ("gemma4_text", 5376, 60, 32, 16, 256, 21504, 262144, True, 0, 0)),
        ("gemma-4-12b", ("gemma4_unified_text", 3840, 48, 16, 8, 256, 15360, 262144, True, 0, 0)),
    ],
)
def test_figures_of_the_gemma_models(registry, name, figures):
    arch = resolve_model(name, registry)
    assert tuple(getattr(arch, figure) for figure in FIGURES) == figures


def test_context_lengths_and_layer_layouts_come_from_the_configs(registry):
    lengths = {name: context_length(resolve_model(name, registry)) for name in GEMMA_MODELS}
    assert lengths == {"gemma-3n-e2b": 32768, "gemma-3n-e4b": 32768, "gemma-4-e2b": 131072, "gemma-4-e4b": 131072,
                       "gemma-4-26b-a4b": 262144, "gemma-4-31b": 262144, "gemma-4-12b": 262144}
    e2b = resolve_model("gemma-3n-e2b", registry).config
    assert e2b["intermediate_size"] == [8192] * 30
    assert e2b["activation_sparsity_pattern"] == [0.95] * 10 + [0.0] * 20
    assert e2b["layer_types"] == ([SLIDING] * 4 + [FULL]) * 6 and e2b["num_kv_shared_layers"] == 10
    gemma4_e2b = resolve_model("gemma-4-e2b", registry).config
    assert gemma4_e2b["layer_types"] == ([SLIDING] * 4 + [FULL]) * 7
    assert (gemma4_e2b["num_kv_shared_layers"], gemma4_e2b["use_double_wide_mlp"]) == (20, True)
    # full-attention layers: 512-wide heads; on the large models also their own (fewer) KV heads
    assert {int(i): v for i, v in gemma4_e2b["per_layer_config"].items()} == {i: {"head_dim": 512}
                                                                              for i in range(4, 35, 5)}
    big = resolve_model("gemma-4-31b", registry).config
    assert big["layer_types"] == ([SLIDING] * 5 + [FULL]) * 10 and big["attention_k_eq_v"] is True
    assert {int(i): v for i, v in big["per_layer_config"].items()} == {
        i: {"head_dim": 512, "num_key_value_heads": 4} for i in range(5, 60, 6)}


# Meta-device builds of the text decoders.
BUILT = {
    "gemma-3n-e2b": 4_435_182_688,
    "gemma-3n-e4b": 6_835_235_568,
    "gemma-4-e2b": 4_628_569_344,
    "gemma-4-e4b": 7_463_013_376,
    "gemma-4-26b-a4b": 25_233_141_760,
    "gemma-4-31b": 30_697_345_280,
    "gemma-4-12b": 11_907_350_272,
}


@pytest.mark.parametrize("name", GEMMA_MODELS)
def test_meta_build_parameter_counts(registry, name):
    built = count_parameters(resolve_model(name, registry))
    assert built == BUILT[name]
    entry = registry.lookup(name)
    assert f"{built:,}" in entry.published_params_source
    if entry.published_params:
        assert abs(built - entry.published_params) / entry.published_params < 0.01, (name, built)


def test_gemma_4_e2b_effective_count_is_the_model_without_its_per_layer_embeddings(registry):
    arch = resolve_model("gemma-4-e2b", registry)
    per_layer_table = 262144 * arch.num_layers * 256
    assert abs(count_parameters(arch) - per_layer_table - 2.3e9) / 2.3e9 < 0.02  # "2.3B effective"


# ---------------------------------------------------------------------------------- per-layer FFN widths


def test_a_list_of_widths_is_accepted_and_its_widest_is_the_figure():
    check_config_figures({"intermediate_size": [8192] * 30, "num_hidden_layers": 30}, "test")
    from transformers import Gemma3nTextConfig

    config = Gemma3nTextConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, intermediate_size=[96, 256, 128], vocab_size=128,
                               vocab_size_per_layer_input=128, hidden_size_per_layer_input=16, num_kv_shared_layers=0,
                               layer_types=[SLIDING, SLIDING, FULL], activation_sparsity_pattern=[0.0] * 3)
    arch = architecture_from_config(config, "uneven", "test")
    assert arch.intermediate_size == 256 and arch.config["intermediate_size"] == [96, 256, 128]
    model = build_model(arch)
    assert [layer.mlp.gate_proj.out_features for layer in model.model.layers] == [96, 256, 128]


@pytest.mark.parametrize(
    ("widths", "message"),
    [(["8192", 8192], "intermediate_size[0] is \"8192\""), ([8192, -1], "intermediate_size[1] is -1"),
     ([8192, 1e15], "intermediate_size[1] is 1000000000000000.0"),
     ([8192, 10**15], "intermediate_size[1] is 1000000000000000"),
     ([True, 8192], "intermediate_size[0] is true"), ([8192, None], "intermediate_size[1] is null"),
     ([8192, [8192]], "intermediate_size[1] is [8192]"), ([], "intermediate_size is []"),
     ([8192] * 3, "lists 3 widths for 2 layers")],
)
def test_bad_widths_in_a_list_are_refused_as_one_line(tmp_path, widths, message):
    text = {"model_type": "gemma3n_text", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "intermediate_size": widths}
    for where, config in (("top", text), ("text_config", {"model_type": "gemma3n", "text_config": text})):
        folder = tmp_path / where
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        result = CliRunner().invoke(app, ["estimate", "--model", str(folder), "--method", "lora", "--batch-size",
                                          "1", "--seq-len", "16"])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert lines[0].startswith("error: ") and message in lines[0], lines[0]
        assert "Traceback" not in result.output


def test_a_list_of_widths_where_the_family_takes_one_number_is_one_line(tmp_path):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": [128, 128], "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["estimate", "--model", str(tmp_path), "--method", "lora"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output


@pytest.mark.parametrize(
    ("model_type", "architecture", "name"),
    [("gemma3n", "Gemma3nForConditionalGeneration", "gemma-3n-e2b"),
     ("gemma4", "Gemma4ForConditionalGeneration", "gemma-4-31b"),
     ("gemma4_unified", "Gemma4UnifiedForConditionalGeneration", "gemma-4-12b")],
)
def test_a_multimodal_checkpoint_folder_plans_its_text_decoder(registry, tmp_path, model_type, architecture, name):
    wrapper = {"model_type": model_type, "architectures": [architecture],
               "text_config": dict(registry.lookup(name).config), "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(wrapper))
    arch = resolve_model(str(tmp_path), registry)
    text_type = registry.lookup(name).config["model_type"]
    assert arch.model_type == text_type and f"text decoder ({text_type}) of the {model_type} checkpoint" in arch.source
    bundled = resolve_model(name, registry)
    assert tuple(getattr(arch, f) for f in FIGURES) == tuple(getattr(bundled, f) for f in FIGURES)
    assert count_parameters(arch) == BUILT[name]


# ------------------------------------------------------------------------------------------------ building


def test_fewer_layers_keep_the_first_layers_of_gemma_3n(registry):
    arch = resolve_model("gemma-3n-e2b", registry)
    twelve = build_config(arch, num_hidden_layers=12)
    assert twelve.intermediate_size == [8192] * 12
    assert twelve.activation_sparsity_pattern == [0.95] * 10 + [0.0] * 2
    assert twelve.num_kv_shared_layers == 0  # the first 20 layers compute their own keys and values
    deep = build_config(arch, num_hidden_layers=25)
    assert deep.num_kv_shared_layers == 5 and deep.kv_sharing_modes[19:21] == ["store", "reuse"]
    one = build_model(arch, num_layers=1)
    assert one.model.layers[0].self_attn.v_proj.out_features == 512


def test_fewer_layers_keep_the_first_layers_of_gemma_4(registry):
    big = resolve_model("gemma-4-31b", registry)
    # transformers makes a model's last layer full attention; a model cut to its first layer keeps that layer's type
    assert build_config(big, num_hidden_layers=1).layer_types == [SLIDING]
    assert build_model(big, num_layers=1).model.layers[0].self_attn.v_proj is not None
    assert [m.target for m in decoder_layer_modules(big)][:4] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    twelve = build_config(big, num_hidden_layers=12)
    assert twelve.layer_types == ([SLIDING] * 5 + [FULL]) * 2
    assert [twelve.per_layer_config[i].head_dim for i in range(12)] == [256] * 5 + [512] + [256] * 5 + [512]
    assert [twelve.per_layer_config[i].num_key_value_heads for i in (0, 5)] == [16, 4]
    layers = build_model(big, num_layers=6).model.layers
    assert layers[0].self_attn.v_proj is not None and layers[5].self_attn.v_proj is None  # values = keys
    assert layers[5].self_attn.q_proj.out_features == 32 * 512
    e2b = resolve_model("gemma-4-e2b", registry)
    assert build_config(e2b, num_hidden_layers=10).num_kv_shared_layers == 0
    assert build_config(e2b, num_hidden_layers=20).num_kv_shared_layers == 5
    shared = build_model(e2b, num_layers=20).model.layers
    assert not hasattr(shared[19].self_attn, "v_proj") and shared[19].mlp.gate_proj.out_features == 2 * 6144
    assert shared[0].mlp.gate_proj.out_features == 6144


@pytest.mark.parametrize("name", GEMMA_MODELS)
def test_default_lora_targets_q_and_v(registry, name):
    candidate = build_candidate("lora", resolve_model(name, registry))
    assert candidate.peft_kwargs["target_modules"] == ["q_proj", "v_proj"]


def test_gemma_4_26b_experts_are_fused_weights_beside_a_dense_mlp(registry):
    arch = resolve_model("gemma-4-26b-a4b", registry)
    assert {p.path: p.shape for p in expert_parameters(arch)} == {"experts.gate_up_proj": (128, 1408, 2816),
                                                                   "experts.down_proj": (128, 2816, 704)}
    assert {m.target for m in decoder_layer_modules(arch)} >= {"gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize(
    ("name", "differences"),
    [("gemma-3n-e2b", ["intermediate_size per layer (all alike)", "activation sparsity on some layers only",
                       "the last 10 layers reuse earlier keys and values (num_kv_shared_layers)"]),
     ("gemma-4-e2b", ["the last 20 layers reuse earlier keys and values (num_kv_shared_layers)"]),
     ("gemma-4-e4b", ["the last 18 layers reuse earlier keys and values (num_kv_shared_layers)"]),
     ("gemma-4-31b", []), ("gemma-4-26b-a4b", []), ("gemma-4-12b", []), ("gemma-3-4b", []), ("gpt-oss-20b", [])],
)
def test_layer_differences(registry, name, differences):
    assert layer_differences(resolve_model(name, registry)) == differences


@pytest.mark.parametrize("name", ["gemma-3n-e2b", "gemma-3n-e4b", "gemma-4-e2b", "gemma-4-e4b"])
def test_the_estimator_traces_every_layer_of_models_whose_layers_differ(name):
    from peftpick.estimator import _irregular_layers

    assert _irregular_layers(resolve_model(name))


# ------------------------------------------------------------------------------------------------ LoRA counts


def _lora_count(name: str, layers: int, layer_types: list[str] | None = None, shared: int | None = None) -> int:
    """LoRA r=32 on q_proj and v_proj, from the published layout (not from a build)."""
    arch = resolve_model(name)
    config = arch.config
    full_heads = {int(i): v for i, v in (config.get("per_layer_config") or {}).items()}
    types = layer_types or config["layer_types"][:layers]
    shared = config.get("num_kv_shared_layers", 0) if shared is None else shared
    total = 0
    for index, kind in enumerate(types):
        override = full_heads.get(config["layer_types"].index(kind), {}) if kind == FULL else {}
        head_dim = override.get("head_dim", arch.head_dim)
        kv_heads = override.get("num_key_value_heads", arch.num_kv_heads)
        total += 32 * (arch.hidden_size + arch.num_heads * head_dim)  # q_proj
        k_eq_v = config.get("attention_k_eq_v") and kind == FULL
        if index < len(types) - shared and not k_eq_v:
            total += 32 * (arch.hidden_size + kv_heads * head_dim)  # v_proj
    return total


@pytest.mark.parametrize(
    ("name", "layers"),
    [("gemma-3n-e2b", 30), ("gemma-3n-e4b", 35), ("gemma-4-e2b", 35), ("gemma-4-e4b", 42), ("gemma-4-26b-a4b", 30),
     ("gemma-4-31b", 60), ("gemma-4-12b", 48)],
)
def test_peft_counts_lora_on_the_full_models_as_their_layout_says(name, layers):
    from peft import get_peft_model

    arch = resolve_model(name)
    candidate = build_candidate("lora", arch)
    assert candidate.rank == 32
    peft_model = get_peft_model(build_model(arch), candidate.peft_config())  # meta device: no memory
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == _lora_count(name, layers)


# Shrunk copies, each keeping what makes its layers differ: KV-shared tails (with Gemma 4 E2B's double-wide MLPs),
# 512-wide full-attention heads, keys used as values, experts beside a dense MLP.
SHRUNK = {
    "gemma-3n-e2b": dict(num_layers=4, num_kv_shared_layers=2),
    "gemma-4-e2b": dict(num_layers=4, layer_types=[SLIDING, FULL, SLIDING, FULL], num_kv_shared_layers=2),
    "gemma-4-e4b": dict(num_layers=4, layer_types=[FULL, SLIDING, SLIDING, FULL], num_kv_shared_layers=2),
    "gemma-4-31b": dict(num_layers=3, layer_types=[SLIDING, FULL, FULL]),
    "gemma-4-12b": dict(num_layers=2, layer_types=[SLIDING, FULL]),
    "gemma-4-26b-a4b": dict(num_layers=2),
}


@pytest.mark.parametrize(("name", "targets"), [(name, None) for name in SHRUNK] + [
    ("gemma-4-26b-a4b", ["mlp"]), ("gemma-4-e2b", ["all-linear"]), ("gemma-3n-e2b", ["attn", "mlp"])])
def test_lora_on_a_shrunk_model_trains_and_its_count_matches_peft(name, targets):
    import peftpick
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    shape = dict(SHRUNK[name])
    config, arch = _tiny(name, **shape)
    if "layer_types" in shape:
        assert config.layer_types == shape["layer_types"]
    candidate = build_candidate("lora", arch, targets=targets)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
    peft_model = get_peft_model(model, candidate.peft_config())
    trainable, total = peft_model.get_nb_trainable_parameters()
    if targets is None and name != "gemma-4-26b-a4b":
        assert trainable == _lora_count_of(config, arch, candidate.rank)
    ids = torch.randint(0, arch.vocab_size, (2, 8))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert grads and all(g is not None for g in grads)

    estimate = peftpick.estimate(config, candidate.peft_config(), batch_size=1, seq_len=16, exact=True)
    assert (estimate.trainable_params, estimate.total_params) == (trainable, total)


def _lora_count_of(config, arch, rank: int) -> int:
    """LoRA on q_proj / v_proj of a built config, layer by layer (v_proj only where the layer has its own)."""
    total = 0
    shared_from = config.num_hidden_layers - getattr(config, "num_kv_shared_layers", 0)
    for index, kind in enumerate(config.layer_types):
        layer = config.per_layer_config[index] if getattr(config, "is_heterogeneous", False) else config
        head_dim = layer._getattr_without_heterogeneous_validation("head_dim")
        kv_heads = layer._getattr_without_heterogeneous_validation("num_key_value_heads")
        total += rank * (arch.hidden_size + arch.num_heads * head_dim)
        if index < shared_from and not (getattr(config, "attention_k_eq_v", False) and kind == FULL):
            total += rank * (arch.hidden_size + kv_heads * head_dim)
    return total
