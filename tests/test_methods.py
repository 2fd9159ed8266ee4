"""The method catalogue (methods/): settings read from the benchmark runs, targets resolved per architecture,
width-dependent settings made valid, and every candidate accepted by PEFT on tiny real-weight models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import get_peft_model

from peftpick.errors import PeftpickError
from peftpick.knowledge import LORA_REFERENCE, KnowledgeBase
from peftpick.knowledge.architectures import (
    architecture_from_config,
    build_config,
    build_model,
    resolve_model,
    tiny_overrides,
)
from peftpick.methods import (
    METHODS,
    ArchitectureNotSupported,
    build_candidate,
    candidates_for,
    get_method,
    method_names,
)
from peftpick.methods.base import BENCHMARK

FAMILIES = ("llama-3.2-3b", "qwen2.5-0.5b", "phi-3-mini-4k", "gpt2", "gemma-2-2b")
REQUIRED = ("lora", "rslora", "dora", "lora-fa", "pissa", "olora", "oft", "boft", "ia3", "loha", "lokr", "vera",
            "lily", "miss", "hira", "shira", "prompt-tuning", "prefix-tuning", "full")
# Methods whose PEFT layers do not wrap GPT-2's transformers Conv1D projections (OLoRA: its init ignores the
# transpose); the capability table and peftpick must agree on exactly these.
GPT2_UNSUPPORTED = {"olora", "oft", "boft", "loha", "lokr", "lily", "miss", "shira"}
# Prompt-learning keys that describe the benchmark's model; the candidate leaves them to PEFT.
MODEL_DERIVED = {"num_layers", "token_dim", "num_attention_heads", "encoder_hidden_size", "num_transformer_submodules"}


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    return KnowledgeBase.load()


@pytest.fixture(scope="module")
def arch(kb):
    return lambda name: resolve_model(name, kb.architectures)


def tiny(real, **sizes):
    """(architecture figures, overrides) of a one-layer version of `real` that builds in milliseconds on CPU."""
    overrides = tiny_overrides(real, **sizes)
    figures = architecture_from_config(build_config(real, **overrides), name=f"tiny-{real.name}", source="test")
    return figures, overrides


def run_of(kb, experiment):
    return kb.benchmarks.get(BENCHMARK, experiment)


def train_step(model, vocab_size: int) -> torch.Tensor:
    torch.manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


# ------------------------------------------------------------------------------------------ registry


def test_catalogue_has_every_required_method_once():
    assert method_names("causal-lm") == [spec.key for spec in METHODS]
    assert set(REQUIRED) <= set(method_names("causal-lm"))
    assert len(set(method_names("causal-lm"))) == len(METHODS)
    assert len({spec.display_name.lower() for spec in METHODS}) == len(METHODS)
    # both workloads' keys, each once: the image catalogue adds LoRA r64
    assert method_names() == [*method_names("causal-lm"), "lora-r64"]


def test_image_catalogue_takes_its_settings_from_the_image_suite():
    from peftpick.methods import IMAGE_METHODS

    assert all(spec.benchmark == "image-gen" for spec in IMAGE_METHODS)
    runs = {spec.key: spec.source_run for spec in IMAGE_METHODS}
    assert runs["lora"] == "lora/flux2-klein-default" and runs["lora-r64"] == "lora/flux2-klein-rank64"
    assert runs["pissa"] == "lora/flux2-klein-default"  # borrowed: no PiSSA run in the suite
    assert "rslora" not in runs and "prompt-tuning" not in runs


def test_specs_agree_with_the_capability_table(kb):
    # A typo in peft_type or config_class would only show up when PEFT builds the config.
    for spec in METHODS:
        if spec.peft_type is None:
            assert spec.key == "full" and spec.config_class is None
            continue
        assert kb.capabilities_of(spec.peft_type).config_class == spec.config_class, spec.key
        assert spec.summary and "\n" not in spec.summary


def test_get_method_accepts_keys_display_names_and_aliases():
    assert get_method("rsLoRA").key == "rslora"
    assert get_method("LoRA-FA").key == get_method("lorafa").key == get_method("lora_fa").key == "lora-fa"
    assert get_method("Prompt Tuning").key == get_method("prompt_tuning").key == "prompt-tuning"
    assert get_method("Full fine-tuning").key == get_method("FULL").key == "full"
    assert get_method(get_method("oft")) is get_method("OFT")


@pytest.mark.parametrize(("typo", "suggested"), [("lorra", "lora"), ("dorra", "dora"), ("vira", "vera"),
                                                 ("prefixtunin", "prefix-tuning")])
def test_unknown_method_names_suggest_close_matches(typo, suggested):
    with pytest.raises(PeftpickError, match="unknown method") as error:
        get_method(typo)
    assert "did you mean" in error.value.fix and suggested in error.value.fix.split("?")[0]
    assert "known methods:" in error.value.fix


def test_unknown_method_without_close_match_lists_all():
    with pytest.raises(PeftpickError) as error:
        get_method("quantum-annealing")
    assert "did you mean" not in error.value.fix and "rslora" in error.value.fix


# ------------------------------------------------------------------------------------------ settings from runs


@pytest.mark.parametrize("spec", [s for s in METHODS if s.benchmark_run], ids=lambda s: s.key)
def test_settings_are_the_runs_settings_on_the_benchmark_model(spec, kb, arch):
    """On Llama-3.2-3B (the suite's model) the candidate must reproduce the run's stored config and training
    settings, with only the keys that describe the model handed over to PEFT."""
    run = run_of(kb, spec.benchmark_run)
    candidate = spec.candidate(arch("llama-3.2-3b"), kb)
    assert candidate.benchmark_run == spec.benchmark_run
    assert candidate.learning_rate == pytest.approx(float(run["learning_rate"]))
    assert candidate.optimizer == spec.optimizer == {"AdamW": "adamw", "lora-fa": "lora-fa"}[run["optimizer"]]
    assert spec.benchmark_run in candidate.notes[0]
    if spec.config_class is None:
        assert run["peft_config_json"] == "" and candidate.peft_kwargs == {}
        return
    stored = json.loads(run["peft_config_json"])
    kwargs = dict(candidate.peft_kwargs)
    for key in ("target_modules", "feedforward_modules"):
        if key in stored:
            assert set(kwargs.pop(key)) == set(stored.pop(key)), key
    assert kwargs == {k: v for k, v in stored.items() if k not in MODEL_DERIVED}


def test_headline_numbers(kb, arch):
    llama = arch("llama-3.2-3b")
    build = lambda name: build_candidate(name, llama, kb)  # noqa: E731

    rslora = build("rslora")
    assert (rslora.rank, rslora.peft_kwargs["lora_alpha"], rslora.peft_kwargs["use_rslora"]) == (64, 64, True)
    assert rslora.benchmark_run == "lora/llama-3.2-3B-rank64-rslora"
    lora = build("lora")
    assert (lora.rank, lora.peft_kwargs["lora_alpha"], lora.peft_kwargs["use_rslora"]) == (32, 64, False)
    assert lora.peft_kwargs["target_modules"] == ["q_proj", "v_proj"]
    assert build("dora").peft_kwargs["use_dora"] is True
    lora_fa = build("lora-fa")
    assert lora_fa.optimizer == "lora-fa" and lora_fa.rank == 32
    assert build("hira").learning_rate == pytest.approx(4.5e-3)
    assert build("shira").learning_rate == pytest.approx(3e-4)
    lokr = build("lokr")
    assert (lokr.learning_rate, lokr.peft_kwargs["decompose_factor"], lokr.peft_kwargs["alpha"]) == (3e-3, 4, 64)
    ia3 = build("ia3")
    assert ia3.learning_rate == pytest.approx(5e-3) and len(ia3.peft_kwargs["target_modules"]) == 7
    assert ia3.peft_kwargs["feedforward_modules"] == ["gate_proj", "up_proj", "down_proj"]
    assert build("vera").rank == 256
    lily = build("lily")
    assert (lily.rank, lily.peft_kwargs["stride_A"], lily.peft_kwargs["num_B"]) == (140, 14, 2)
    assert lily.peft_kwargs["target_modules"] == ["gate_proj", "up_proj", "down_proj"]
    miss = build("miss")
    assert (miss.rank, miss.peft_kwargs["init_weights"]) == (64, "bat")
    assert build("oft").rank == 32 and build("boft").peft_kwargs["boft_block_size"] == 4
    prompt = build("prompt-tuning")
    assert prompt.peft_kwargs == {"num_virtual_tokens": 200, "prompt_tuning_init": "SAMPLE_VOCAB"}
    assert prompt.learning_rate == pytest.approx(1e-3)
    prefix = build("prefix-tuning")
    assert prefix.peft_kwargs["num_virtual_tokens"] == 50 and prefix.learning_rate == pytest.approx(5e-3)
    full = build("full")
    assert (full.peft_type, full.peft_config_class, full.peft_config()) == (None, None, None)
    assert full.learning_rate == pytest.approx(1e-5)


def test_each_method_uses_its_best_run_or_says_why_not(kb, arch):
    llama = arch("llama-3.2-3b")
    for spec in METHODS:
        if spec.benchmark_run is None:
            continue
        runs = kb.benchmarks.runs(BENCHMARK, spec.peft_type or "FULL_FINETUNING")
        if spec.run_variant is not None:
            runs = runs[runs["variant"] == spec.run_variant]
        assert spec.benchmark_run in set(runs["experiment"]), spec.key
        best = runs.iloc[0]
        if best["experiment"] == spec.benchmark_run:
            continue
        assert spec.run_choice, f"{spec.key} uses {spec.benchmark_run}, not its best run {best['experiment']}"
        notes = " ".join(spec.candidate(llama, kb).notes)
        assert best["experiment"] in notes and spec.run_choice in notes
    # LoRA is the suite's reference, so its relative score is 1.0 by definition.
    assert get_method("lora").benchmark_run == LORA_REFERENCE[BENCHMARK]
    assert get_method("lily").benchmark_run == "lily/llama-3.2-3B-rank140-mlp-a2-b2-s8.0"
    assert get_method("miss").benchmark_run == "miss/llama-3.2-3B-bat"


@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_pissa_and_olora_borrow_lora_r32_settings(name, kb, arch):
    llama = arch("llama-3.2-3b")
    candidate = build_candidate(name, llama, kb)
    lora = build_candidate("lora", llama, kb)
    assert candidate.benchmark_run is None and get_method(name).benchmark_run is None
    assert candidate.peft_kwargs["init_lora_weights"] == name
    assert {**candidate.peft_kwargs, "init_lora_weights": True} == lora.peft_kwargs
    assert candidate.learning_rate == lora.learning_rate and candidate.optimizer == "adamw"
    assert "no run in the comparison suite" in candidate.notes[0]
    assert LORA_REFERENCE[BENCHMARK] in candidate.notes[0]


def test_default_knowledge_base_is_loaded_when_none_given(arch):
    assert build_candidate("rslora", arch("llama-3.2-3b")).rank == 64


# ------------------------------------------------------------------------------------------ overrides


def test_rank_override_scales_alpha_except_for_rslora(kb, arch):
    llama = arch("llama-3.2-3b")
    lora = build_candidate("lora", llama, kb, rank=8)
    assert (lora.rank, lora.peft_kwargs["lora_alpha"]) == (8, 16)  # the run's alpha/r = 2 kept
    assert any("alpha/r = 2" in note for note in lora.notes)
    rslora = build_candidate("rslora", llama, kb, rank=16)
    assert (rslora.rank, rslora.peft_kwargs["lora_alpha"]) == (16, 64)  # alpha/sqrt(r) scaling: alpha stays
    loha = build_candidate("loha", llama, kb, rank=48)
    assert (loha.rank, loha.peft_kwargs["alpha"]) == (48, 96)
    assert build_candidate("oft", llama, kb, rank=16).rank == 16
    assert build_candidate("lily", llama, kb, rank=64).peft_kwargs["scaling"] == 8.0  # Lily's scale is not alpha/r


@pytest.mark.parametrize("name", ["ia3", "boft", "prompt-tuning", "prefix-tuning", "full"])
def test_rank_override_on_methods_without_rank_is_refused(name, kb, arch):
    with pytest.raises(PeftpickError, match="has no rank"):
        build_candidate(name, arch("llama-3.2-3b"), kb, rank=8)


@pytest.mark.parametrize("bad", [0, -4, 2.5, "8", True])
def test_bad_ranks_are_refused(bad, kb, arch):
    with pytest.raises(PeftpickError, match="rank must be a positive whole number"):
        build_candidate("lora", arch("llama-3.2-3b"), kb, rank=bad)


def test_targets_override_by_role_shortcut_and_module_name(kb, arch):
    llama, phi3 = arch("llama-3.2-3b"), arch("phi-3-mini-4k")
    assert build_candidate("lora", llama, kb, targets=["mlp"]).peft_kwargs["target_modules"] == [
        "gate_proj", "up_proj", "down_proj"]
    assert build_candidate("dora", llama, kb, targets="attn").peft_kwargs["target_modules"] == [
        "q_proj", "k_proj", "v_proj", "o_proj"]
    assert build_candidate("lora", llama, kb, targets=["o_proj", "down_proj"]).peft_kwargs["target_modules"] == [
        "o_proj", "down_proj"]
    all_linear = build_candidate("hira", phi3, kb, targets=["all-linear"])
    assert all_linear.peft_kwargs["target_modules"] == ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"]
    # A Llama name on Phi-3 is taken as its role and lands on the fused projection, with both notes.
    fused = build_candidate("lora", phi3, kb, targets=["q_proj", "k_proj"])
    assert fused.peft_kwargs["target_modules"] == ["qkv_proj"]
    assert any("no module q_proj" in note for note in fused.notes)
    assert any("covers v too" in note for note in fused.notes)
    # Phi-3's own fused name needs no note about fusion.
    own = build_candidate("lora", phi3, kb, targets=["qkv_proj"])
    assert own.peft_kwargs["target_modules"] == ["qkv_proj"] and not any("fuses" in n for n in own.notes)


def test_ia3_feedforward_modules_follow_the_targets(kb, arch):
    phi3, gpt2 = arch("phi-3-mini-4k"), arch("gpt2")
    assert build_candidate("ia3", phi3, kb).peft_kwargs["feedforward_modules"] == ["gate_up_proj", "down_proj"]
    assert build_candidate("ia3", gpt2, kb).peft_kwargs["feedforward_modules"] == ["c_fc", "mlp.c_proj"]
    attention_only = build_candidate("ia3", arch("llama-3.2-3b"), kb, targets=["attn_qv"])
    assert attention_only.peft_kwargs["target_modules"] == ["q_proj", "v_proj"]
    assert attention_only.peft_kwargs["feedforward_modules"] == []


def test_unknown_targets_name_the_architectures_modules(kb, arch):
    with pytest.raises(PeftpickError, match="unknown target 'attention_q'") as error:
        build_candidate("lora", arch("gpt2"), kb, targets=["attention_q"])
    assert "c_attn" in error.value.fix and "mlp.c_proj" in error.value.fix
    with pytest.raises(PeftpickError, match="non-empty list"):
        build_candidate("lora", arch("gpt2"), kb, targets=[])


@pytest.mark.parametrize("name", ["prompt-tuning", "prefix-tuning", "full"])
def test_targets_on_methods_without_targets_are_refused(name, kb, arch):
    with pytest.raises(PeftpickError, match="has no target modules"):
        build_candidate(name, arch("llama-3.2-3b"), kb, targets=["q"])


# ------------------------------------------------------------------------------------------ architectures


def test_phi3_fused_qkv_note_and_gpt2_conv1d(kb, arch):
    phi3 = build_candidate("rslora", arch("phi-3-mini-4k"), kb)
    assert phi3.peft_kwargs["target_modules"] == ["qkv_proj"]
    assert "phi-3-mini-4k fuses q, k and v into qkv_proj: the adapter covers k too" in phi3.notes
    gpt2 = build_candidate("lora", arch("gpt2"), kb)
    assert gpt2.peft_kwargs["target_modules"] == ["c_attn"] and gpt2.peft_kwargs["fan_in_fan_out"] is True
    assert build_candidate("lora", arch("llama-3.2-3b"), kb).peft_kwargs["fan_in_fan_out"] is False


def test_gpt2_exclusions_are_clear(kb, arch):
    gpt2 = arch("gpt2")
    candidates, exclusions = candidates_for(gpt2, kb)
    assert {e.method for e in exclusions} == GPT2_UNSUPPORTED
    assert {c.method for c in candidates} == set(method_names("causal-lm")) - GPT2_UNSUPPORTED
    assert all(e.constraint == "architecture" and "Conv1D" in e.reason and "gpt2" in e.reason for e in exclusions)
    with pytest.raises(ArchitectureNotSupported) as error:
        build_candidate("oft", gpt2, kb)
    assert isinstance(error.value, PeftpickError)
    assert error.value.problem.startswith("OFT cannot be applied to gpt2")
    assert "c_attn" in error.value.problem and "OFTConfig" in error.value.problem


def test_mixture_of_experts_excludes_mlp_only_methods(kb, arch):
    moe = arch("qwen3-30b-a3b")
    candidates, exclusions = candidates_for(moe, kb)
    assert [e.method for e in exclusions] == ["lily"]
    assert "experts" in exclusions[0].reason and "Lily" in exclusions[0].reason
    ia3 = next(c for c in candidates if c.method == "ia3")
    assert ia3.peft_kwargs["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert any("mixture of 128 experts" in note for note in ia3.notes)


def test_candidates_for_all_and_for_a_selection(kb, arch):
    llama = arch("llama-3.2-3b")
    candidates, exclusions = candidates_for(llama, kb)
    assert [c.method for c in candidates] == method_names("causal-lm") and exclusions == []
    chosen, _ = candidates_for(llama, kb, methods=["OFT", "lora", "oft"])
    assert [c.method for c in chosen] == ["oft", "lora"]


def test_lily_keeps_the_runs_number_of_shared_a_adapters(kb, arch):
    candidate = build_candidate("lily", arch("llama-3.1-8b"), kb)  # 32 layers; the run's 14 of 28 gave 2 groups
    assert candidate.peft_kwargs["stride_A"] == 16
    assert any("stride_A 16 instead of the run's 14" in note for note in candidate.notes)


def test_width_dependent_settings_move_to_the_closest_valid_value(kb, arch):
    # Hidden 42 in 3 heads of 14 (one KV head): q_proj is 42 -> 42, v_proj 42 -> 14; none of the run's sizes fit.
    figures, overrides = tiny(arch("llama-3.2-3b"), hidden_size=42, num_heads=3)
    oft = build_candidate("oft", figures, kb)
    assert oft.rank == 21  # divisors of 42 leaving blocks of >= 2 features: ..., 14, 21; 21 is closest to 32
    assert any("using 21" in note for note in oft.notes)
    boft = build_candidate("boft", figures, kb)
    assert boft.peft_kwargs["boft_block_size"] == 3  # 3 and 6 divide 42; 3 is closer to the run's 4
    miss = build_candidate("miss", figures, kb)
    assert miss.rank == 14  # bat blocks must divide 42 and 14: gcd 14
    shira = build_candidate("shira", figures, kb)
    assert shira.rank == 42 * 14 // (42 + 14)  # r x (in + out) <= in x out on v_proj
    for candidate in (oft, boft, miss, shira):
        model = build_model(arch("llama-3.2-3b"), device="cpu", dtype="float32", **overrides)
        peft_model = get_peft_model(model, candidate.peft_config())
        assert math.isfinite(train_step(peft_model, figures.vocab_size).item())


# ------------------------------------------------------------------------------------------ PEFT accepts them


APPLY_CASES = [
    (family, spec.key)
    for family in FAMILIES
    for spec in METHODS
    if not (family == "gpt2" and spec.key in GPT2_UNSUPPORTED)
]


@pytest.mark.parametrize(("family", "method"), APPLY_CASES)
def test_candidate_trains_on_a_tiny_model(family, method, kb, arch):
    real = arch(family)
    figures, overrides = tiny(real)
    candidate = build_candidate(method, figures, kb)
    model = build_model(real, device="cpu", dtype="float32", **overrides)
    assert model.config.vocab_size == figures.vocab_size and figures.num_layers == 1
    total = sum(p.numel() for p in model.parameters())
    config = candidate.peft_config()
    if config is None:
        trained = model
    else:
        trained = get_peft_model(model, config)
        targets = candidate.peft_kwargs.get("target_modules")
        if targets is not None:
            wrapped = trained.base_model.targeted_module_names
            # One decoder layer: every target wraps exactly one module, and nothing else is wrapped.
            assert len(wrapped) == len(targets), (wrapped, targets)
            assert all(any(name == t or name.endswith("." + t) for name in wrapped) for t in targets)
    trainable = [p for p in trained.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    assert count == total if config is None else count > 0
    loss = train_step(trained, figures.vocab_size)
    assert math.isfinite(loss.item())
    grads = [p.grad for p in trainable if p.grad is not None]
    assert grads and sum(g.abs().sum().item() for g in grads) > 0
    if config is not None:
        frozen = trained.get_input_embeddings().weight
        assert not frozen.requires_grad and frozen.grad is None  # the base model stays frozen


def test_lora_fa_optimizer_trains_b_only(kb, arch):
    from peft.optimizers import create_lorafa_optimizer

    real = arch("qwen2.5-0.5b")
    figures, overrides = tiny(real)
    candidate = build_candidate("lora-fa", figures, kb)
    assert candidate.optimizer == "lora-fa"
    model = get_peft_model(build_model(real, device="cpu", dtype="float32", **overrides), candidate.peft_config())
    optimizer = create_lorafa_optimizer(model, r=candidate.rank, lora_alpha=candidate.peft_kwargs["lora_alpha"],
                                        lr=candidate.learning_rate)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    train_step(model, figures.vocab_size)
    optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before if "lora_A" in name)
    assert any(not torch.equal(before[name], after[name]) for name in before if "lora_B" in name)
