"""Report renderers: to_dict schema, JSON safety, text / Markdown / HTML content, atomic writes, the PEFT snippet.

Every test builds its Recommendation by hand (`sample_recommendation`), so nothing here depends on the recommender
or the estimator; test_cli.py reuses the same sample.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from peftpick.errors import PeftpickError
from peftpick.report import SCHEMA_VERSION, peft_snippet, render, to_dict, write_report
from peftpick.report.snippet import ADAPTER_SECTION, MODEL_SECTION
from peftpick.types import (
    GIB,
    Architecture,
    BenchmarkEvidence,
    Candidate,
    Exclusion,
    MemoryEstimate,
    RankedCandidate,
    Recommendation,
    Request,
    Serve,
    ServingVerdict,
    TrainingPlan,
    TrainingShape,
)

TOTAL_PARAMS = 134_515_008
VERDICT = "rsLoRA (r=16) fits 8 GiB with 4.8 GiB to spare and scores 1.08x plain LoRA on MetaMathQA."
EXCLUSION_REASON = "vLLM loads only LoRA adapters; OFT would have to be merged, which multi-adapter serving rules out"

TOP_LEVEL_KEYS = {
    "schema_version", "peftpick_version", "request", "architecture", "gpu", "assumptions", "verdict", "ranked",
    "excluded", "best", "runner_up", "peft_snippet", "goal_weights", "uncertainty", "probes", "lengths",
    "alternative",
}
REQUEST_KEYS = {"model", "vram_gib", "serve", "multi_adapter", "quant", "goal", "seq_len", "batch_size", "vram_source",
                "resolution", "frames", "cached_inputs", "loss", "trainer", "packing", "gpus", "strategy",
                "optimizer"}
ARCHITECTURE_KEYS = {
    "name", "model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
    "vocab_size", "tie_word_embeddings", "num_experts", "experts_per_token", "dtype", "hub_id", "local_path", "source",
    "workload", "denoiser",
}
RANKED_KEYS = {
    "rank", "method", "display_name", "peft_type", "peft_config_class", "settings", "benchmark_run",
    "trainable_params", "total_params", "adapter_bytes", "memory", "plan", "evidence", "serving", "probe", "score",
    "reason", "prefer_when", "notes", "quality", "speed", "pareto", "dominated_by", "flags", "drift",
}
SETTINGS_KEYS = {"rank", "alpha", "target_modules", "learning_rate", "optimizer", "other_kwargs"}
MEMORY_KEYS = {
    "peak_allocated_bytes", "peak_reserved_bytes", "peak_allocated_gib", "peak_reserved_gib", "breakdown", "source",
    "fit", "margin_gib", "assumptions",
}
BREAKDOWN_KEYS = {"weights", "adapter", "grads", "optimizer", "activations", "logits/loss", "overhead"}
PLAN_KEYS = {"micro_batch", "gradient_accumulation", "effective_batch", "gradient_checkpointing", "dtype", "seq_len",
             "loss", "loss_saving_bytes", "optimizer", "optimizer_saving_bytes", "gpus", "strategy", "launch"}
EVIDENCE_KEYS = {
    "benchmark", "experiment", "metric", "score", "lora_score", "relative_to_lora", "lora_experiment", "model", "gpu",
    "source_commit",
}
SERVING_KEYS = {"route", "reason", "source", "launch", "conversion", "rank_after", "versions"}
EXCLUDED_KEYS = {"method", "display_name", "constraint", "reason"}


# ------------------------------------------------------------------------------------------------ sample


def memory(allocated_gib: float, reserved_gib: float, trainable: int, *, micro_batch: int = 4,
           checkpointing: bool = False, optimizer: str = "adamw", source: str = "estimated") -> MemoryEstimate:
    allocated = int(allocated_gib * GIB)
    fixed = {"weights": 269_030_272, "adapter": 4 * trainable, "grads": 4 * trainable, "optimizer": 8 * trainable,
             "logits/loss": 300_000_000, "overhead": 67_000_000}
    breakdown = {**fixed, "activations": allocated - sum(fixed.values())}
    breakdown = {key: breakdown[key] for key in ("weights", "adapter", "grads", "optimizer", "activations",
                                                  "logits/loss", "overhead")}
    return MemoryEstimate(
        peak_allocated_bytes=allocated,
        peak_reserved_bytes=int(reserved_gib * GIB),
        breakdown=breakdown,
        trainable_params=trainable,
        total_params=TOTAL_PARAMS + (trainable if trainable < TOTAL_PARAMS else 0),
        shape=TrainingShape(batch_size=micro_batch, seq_len=768, gradient_checkpointing=checkpointing,
                            optimizer=optimizer),
        assumptions=("one CUDA GPU, PyTorch caching allocator",),
        source=source,
    )


def evidence(experiment: str, score: float, lora_score: float = 0.48) -> BenchmarkEvidence:
    return BenchmarkEvidence(
        benchmark="MetaMathQA", experiment=experiment, metric="test accuracy", score=score, lora_score=lora_score,
        lora_experiment="lora/llama-3.2-3B-rank32", model="meta-llama/Llama-3.2-3B", gpu="NVIDIA L40S",
        source_commit="5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40",
    )


RSLORA = Candidate(
    "rslora", "rsLoRA", "LORA", "LoraConfig",
    {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "use_rslora": True,
     "lora_dropout": 0.0},
    learning_rate=1e-4, benchmark_run="lora/llama-3.2-3B-rank32-rslora",
)
LORA_FA = Candidate("lorafa", "LoRA-FA", "LORA", "LoraConfig",
                    {"r": 32, "lora_alpha": 64, "target_modules": ["q_proj", "v_proj"]},
                    learning_rate=2e-4, optimizer="lora-fa")
FULL = Candidate("full", "Full fine-tuning", None, None, {}, learning_rate=2e-5)

ARCHITECTURE = Architecture(
    name="smollm2-135m", model_type="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
    source="bundled registry (source: https://huggingface.co/HuggingFaceTB/SmolLM2-135M)",
    hub_id="HuggingFaceTB/SmolLM2-135M",
)


def sample_recommendation(vram_gib: float = 8.0) -> Recommendation:
    """Three ranked candidates (two with benchmark evidence, full fine-tuning without) and one exclusion."""
    best = RankedCandidate(
        RSLORA, TrainingPlan(4, 4, False, memory(2.9, 3.2, 1_843_200), "fits"),
        ServingVerdict("native", "vLLM loads LoRA adapters and honours the rsLoRA scale", "vllm lora/utils.py@abc1234"),
        evidence("lora/llama-3.2-3B-rank32-rslora", 0.52), adapter_bytes=7_380_000, score=0.91,
        reason="highest benchmark score per GiB among the candidates that fit",
        prefer_when="you want the best measured quality",
    )
    runner_up = RankedCandidate(
        LORA_FA,
        TrainingPlan(4, 4, True, memory(5.9, 7.5, 2_000_000, checkpointing=True, optimizer="lora-fa"), "marginal"),
        ServingVerdict("native", "plain LoRA tensors"), evidence("lora/llama-3.2-3B-rank32-lorafa", 0.50),
        adapter_bytes=8_000_000, score=0.8, reason="frozen A matrices halve optimizer memory",
        prefer_when="memory is tighter than this plan assumes",
    )
    full = RankedCandidate(
        FULL, TrainingPlan(1, 16, True, memory(6.5, 7.0, TOTAL_PARAMS, micro_batch=1, checkpointing=True), "fits"),
        ServingVerdict("native", "a full model"), None, adapter_bytes=269_030_016, score=0.6,
        reason="no benchmark run at this size",
    )
    return Recommendation(
        request=Request("smollm2-135m", vram_gib, serve=Serve.VLLM),
        architecture=ARCHITECTURE,
        assumptions=("figures are estimated on the meta device",),
        ranked=(best, runner_up, full),
        excluded=(Exclusion("oft", "OFT", "serving", EXCLUSION_REASON),),
        verdict=VERDICT,
    )


@pytest.fixture
def rec() -> Recommendation:
    return sample_recommendation()


# -------------------------------------------------------------------------------------------------- to_dict


def test_to_dict_has_the_documented_key_set(rec: Recommendation):
    data = to_dict(rec)
    assert set(data) == TOP_LEVEL_KEYS
    assert set(data["request"]) == REQUEST_KEYS
    assert set(data["architecture"]) == ARCHITECTURE_KEYS
    for entry in data["ranked"]:
        assert set(entry) == RANKED_KEYS
        assert set(entry["settings"]) == SETTINGS_KEYS
        assert set(entry["memory"]) == MEMORY_KEYS
        assert set(entry["memory"]["breakdown"]) == BREAKDOWN_KEYS
        assert set(entry["plan"]) == PLAN_KEYS
        assert set(entry["serving"]) == SERVING_KEYS
        assert entry["evidence"] is None or set(entry["evidence"]) == EVIDENCE_KEYS
    assert all(set(entry) == EXCLUDED_KEYS for entry in data["excluded"])


def test_to_dict_docstring_documents_every_key():
    documented = to_dict.__doc__
    for key in TOP_LEVEL_KEYS | {f"ranked[].{key}" for key in RANKED_KEYS}:
        assert f"| `{key}` |" in documented, key
    nested = (REQUEST_KEYS | ARCHITECTURE_KEYS | SETTINGS_KEYS | MEMORY_KEYS | BREAKDOWN_KEYS | PLAN_KEYS
              | EVIDENCE_KEYS | SERVING_KEYS | EXCLUDED_KEYS)
    for key in nested:
        assert f"`{key}`" in documented, key


def test_to_dict_values(rec: Recommendation):
    data = to_dict(rec)
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert data["request"] == {
        "model": "smollm2-135m", "vram_gib": 8.0, "serve": "vllm", "multi_adapter": False, "quant": "none",
        "goal": "balanced", "seq_len": 768, "batch_size": 4, "vram_source": "given",
        "resolution": None, "frames": None, "cached_inputs": None, "loss": None, "trainer": "plain", "packing": False,
        "gpus": 1, "strategy": "auto", "optimizer": None,
    }
    assert data["architecture"]["hidden_size"] == 576 and data["architecture"]["source"].startswith("bundled")
    assert data["verdict"] == VERDICT
    assert data["gpu"] is None
    assert [entry["method"] for entry in data["ranked"]] == ["rslora", "lorafa", "full"]
    assert [entry["rank"] for entry in data["ranked"]] == [1, 2, 3]
    assert (data["best"], data["runner_up"]) == ("rslora", "lorafa")

    best = data["ranked"][0]
    assert best["settings"] == {
        "rank": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "learning_rate": 1e-4,
        "optimizer": "adamw", "other_kwargs": {"use_rslora": True, "lora_dropout": 0.0},
    }
    assert best["memory"]["peak_reserved_bytes"] == int(3.2 * GIB)
    assert best["memory"]["peak_reserved_gib"] == pytest.approx(3.2, abs=1e-4)
    assert sum(best["memory"]["breakdown"].values()) == best["memory"]["peak_allocated_bytes"]
    assert best["memory"]["source"] == "estimated"
    assert best["memory"]["fit"] == "fits"
    assert best["memory"]["margin_gib"] == pytest.approx(8.0 - 3.2, abs=1e-3)
    assert best["plan"] == {"micro_batch": 4, "gradient_accumulation": 4, "effective_batch": 16,
                            "gradient_checkpointing": False, "dtype": "bfloat16", "seq_len": 768, "loss": "stock",
                            "loss_saving_bytes": None, "optimizer": "adamw", "optimizer_saving_bytes": None,
                            "gpus": 1, "strategy": "single", "launch": None}
    assert best["evidence"]["relative_to_lora"] == pytest.approx(0.52 / 0.48)
    assert best["evidence"]["source_commit"] == "5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40"
    assert best["serving"]["route"] == "native"
    assert best["adapter_bytes"] == 7_380_000

    assert data["ranked"][1]["settings"]["optimizer"] == "lora-fa"
    assert data["ranked"][1]["memory"]["fit"] == "marginal"
    full = data["ranked"][2]
    assert full["evidence"] is None and full["peft_type"] is None and full["settings"]["rank"] is None
    assert data["excluded"] == [
        {"method": "oft", "display_name": "OFT", "constraint": "serving", "reason": EXCLUSION_REASON}
    ]
    assert "LoraConfig(" in data["peft_snippet"]


def test_to_dict_json_round_trip(rec: Recommendation):
    data = to_dict(rec)
    assert json.loads(json.dumps(data, allow_nan=False)) == data


def test_non_finite_numbers_become_null(rec: Recommendation):
    broken = dataclasses.replace(rec.ranked[0], score=float("nan"),
                                 evidence=evidence("lora/llama-3.2-3B-rank32-rslora", 0.52, lora_score=0.0))
    data = to_dict(dataclasses.replace(rec, ranked=(broken, *rec.ranked[1:])))
    text = json.dumps(data, allow_nan=False)  # raises on NaN / inf
    assert data["ranked"][0]["score"] is None
    assert data["ranked"][0]["evidence"]["relative_to_lora"] is None
    assert "NaN" not in text


def test_nothing_ranked(rec: Recommendation):
    empty = dataclasses.replace(rec, ranked=(), verdict="")
    data = to_dict(empty)
    assert data["best"] is None and data["runner_up"] is None and data["peft_snippet"] is None
    for fmt in ("text", "markdown", "html"):
        out = render(empty, fmt)
        assert "No fine-tuning method fits every constraint" in out
        assert EXCLUSION_REASON in out
    assert "data:image/png" not in render(empty, "html")


# ------------------------------------------------------------------------------------------------ renderers


def _positions(text: str, *needles: str) -> list[int]:
    positions = [text.find(needle) for needle in needles]
    assert all(p >= 0 for p in positions), dict(zip(needles, positions))
    return positions


def test_markdown_content_and_order(rec: Recommendation):
    md = render(rec, "markdown")
    positions = _positions(md, VERDICT, "| # | Method |", "## Excluded", "## Recommendation: rsLoRA", "```python",
                           "Runner-up: LoRA-FA", "## Assumptions")
    assert positions == sorted(positions)
    assert f"| OFT | serving | {EXCLUSION_REASON} |" in md
    assert "| 1 | rsLoRA | r=16 / alpha=32 / k,o,q,v |" in md
    assert "3.20 (estimated)" in md  # peak reserved GiB with its provenance
    assert "fits (4.80 GiB spare)" in md and "marginal (0.50 GiB spare)" in md
    assert "1.08x LoRA (benchmark MetaMathQA lora/llama-3.2-3B-rank32-rslora)" in md
    assert "no benchmark run" in md
    assert "Prefer it when memory is tighter than this plan assumes" in md
    assert "GiB = 2^30 bytes" in md
    assert "micro-batch 4 x gradient accumulation 4 (effective batch 16)" in md


def test_text_is_plain_and_names_provenance(rec: Recommendation):
    measured = dataclasses.replace(
        rec.ranked[0],
        plan=dataclasses.replace(rec.ranked[0].plan,
                                 estimate=memory(2.9, 3.2, 1_843_200, source="measured on NVIDIA H100 80GB HBM3")),
    )
    text = render(dataclasses.replace(rec, ranked=(measured, *rec.ranked[1:])), "text")
    assert "\x1b[" not in text  # no colour codes
    positions = _positions(text, VERDICT, "rsLoRA", "Excluded", "Recommendation: rsLoRA", "Assumptions")
    assert positions == sorted(positions)
    assert "measured on NVIDIA H100 80GB HBM3" in text
    assert "(estimated)" in text  # the other candidates
    assert EXCLUSION_REASON in " ".join(text.split())
    assert "peft_config = LoraConfig(" in text


def test_narrow_terminal_keeps_every_cell(rec: Recommendation):
    from peftpick.report.render import to_text

    text = to_text(rec, width=90)
    assert "\u2026" not in text  # nothing cut short with an ellipsis
    table_part = text[: text.index("Memory breakdown")]
    assert max(len(line) for line in table_part.splitlines()) <= 90
    words = set(text.split())
    # Cells wrap over several lines, side by side with other cells, so check word by word.
    for cell in ("highest benchmark score per GiB", "frozen A matrices halve optimizer memory", "plain LoRA tensors"):
        assert set(cell.split()) <= words, cell


def test_html_is_self_contained_with_its_pictures(rec: Recommendation):
    page = render(rec, "html")
    assert page.startswith("<!DOCTYPE html>")
    assert "<style>" in page
    assert "<script" not in page and "<link" not in page
    assert not re.search(r'(?:src|href)="(?!data:)', page)  # no external assets
    # the memory bars; no quality intervals, the sample has no quality figures (tests/test_report_pictures.py)
    assert len(re.findall(r'<svg xmlns="http://www.w3.org/2000/svg"', page)) == 1
    positions = _positions(page, VERDICT, "No quality picture", 'class="picture memory"', "<table>",
                           "<h2>Excluded</h2>",
                           "<h2>Recommendation: rsLoRA</h2>", "<h2>Assumptions</h2>")
    assert positions == sorted(positions)
    assert EXCLUSION_REASON in page
    assert "peft_config = LoraConfig(" in page


def test_html_escapes_text(rec: Recommendation):
    tricky = dataclasses.replace(rec, verdict="<b>bold</b> & more")
    page = render(tricky, "html")
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in page and "<b>bold</b>" not in page


def test_unknown_format_is_a_peftpick_error(rec: Recommendation):
    with pytest.raises(PeftpickError, match="markdown"):
        render(rec, "pdf")


# -------------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("name, marker", [("report.md", "## Ranked candidates"), ("report.html", "<!DOCTYPE html>")])
def test_write_report_by_suffix(rec: Recommendation, tmp_path: Path, name: str, marker: str):
    path = write_report(rec, tmp_path / name)
    assert path == tmp_path / name
    assert marker in path.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_write_report_rejects_other_suffixes(rec: Recommendation, tmp_path: Path):
    target = tmp_path / "report.pdf"
    with pytest.raises(PeftpickError) as caught:
        write_report(rec, target)
    assert str(target) in str(caught.value) and ".md" in str(caught.value) and ".html" in str(caught.value)
    assert not target.exists()


def test_write_report_never_leaves_half_a_file(rec: Recommendation, tmp_path: Path, monkeypatch):
    target = tmp_path / "report.md"
    target.write_text("previous report\n", encoding="utf-8")

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("peftpick.report.files.os.replace", failing_replace)
    with pytest.raises(PeftpickError, match="No space left"):
        write_report(rec, target)
    assert target.read_text(encoding="utf-8") == "previous report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_write_report_into_a_missing_folder(rec: Recommendation, tmp_path: Path):
    with pytest.raises(PeftpickError, match="does not exist"):
        write_report(rec, tmp_path / "missing" / "report.md")


# -------------------------------------------------------------------------------------------------- snippet


def _adapter_section(snippet: str) -> str:
    return snippet[: snippet.index(MODEL_SECTION)]


def test_snippet_builds_the_candidate_config(rec: Recommendation):
    import peft

    snippet = peft_snippet(rec.ranked[0], "HuggingFaceTB/SmolLM2-135M")
    compile(snippet, "<snippet>", "exec")
    assert "from peft import LoraConfig, get_peft_model" in snippet
    namespace: dict = {}
    exec(compile(_adapter_section(snippet), "<adapter section>", "exec"), namespace)
    config = namespace["peft_config"]
    assert isinstance(config, peft.LoraConfig)
    assert (config.r, config.lora_alpha, config.use_rslora) == (16, 32, True)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert config.task_type == "CAUSAL_LM"
    assert "micro_batch_size = 4" in snippet and "gradient_accumulation_steps = 4" in snippet
    assert "learning_rate = 0.0001" in snippet
    assert "# gradient checkpointing off" in snippet


def test_snippet_for_lora_fa_and_full_fine_tuning(rec: Recommendation):
    lora_fa = peft_snippet(rec.ranked[1])
    compile(lora_fa, "<snippet>", "exec")
    assert "from peft.optimizers import create_lorafa_optimizer" in lora_fa
    assert "create_lorafa_optimizer(model=model, r=32, lora_alpha=64, lr=learning_rate)" in lora_fa
    assert "gradient_checkpointing_enable" in lora_fa

    full = peft_snippet(rec.ranked[2])
    compile(full, "<snippet>", "exec")
    assert "peft" not in full.replace("peftpick", "")
    assert ADAPTER_SECTION in full and "gradient_accumulation_steps = 16" in full


def test_quantized_snippet_prepares_the_model(rec: Recommendation):
    snippet = peft_snippet(rec.ranked[0], "org/model", quant="4bit")
    compile(snippet, "<snippet>", "exec")
    assert "BitsAndBytesConfig(" in snippet and "load_in_4bit=True" in snippet
    assert "prepare_model_for_kbit_training(model" in snippet


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A one-layer Llama saved to disk, so a snippet can load it with from_pretrained offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("position", [0, 1, 2], ids=["rslora", "lora-fa", "full"])
def test_whole_snippet_runs_against_a_local_model(rec: Recommendation, tiny_model_dir: Path, position: int,
                                                  capsys, tmp_path: Path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)  # the snippet's last section saves the result into the working folder
    snippet = peft_snippet(rec.ranked[position], str(tiny_model_dir))
    namespace: dict = {}
    exec(compile(snippet, "<snippet>", "exec"), namespace)
    model, optimizer = namespace["model"], namespace["optimizer"]
    assert isinstance(optimizer, torch.optim.Optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = list(model.parameters())
    if rec.ranked[position].candidate.peft_type is None:
        assert len(trainable) == len(total)
    else:
        assert 0 < len(trainable) < len(total)
        assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    assert model.dtype == torch.bfloat16
    assert math.isclose(namespace["learning_rate"], rec.ranked[position].candidate.learning_rate)
    saved = tmp_path / ("fine-tuned-model" if rec.ranked[position].candidate.peft_type is None else "adapter")
    assert (saved / ("config.json" if saved.name == "fine-tuned-model" else "adapter_config.json")).is_file()


def test_pissa_snippet_saves_a_plain_lora_adapter(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    """The snippet of a "convert at save time" verdict keeps the initial adapter and saves with PEFT's conversion,
    so what it writes is the plain LoRA adapter of rank 2r the verdict names."""
    import dataclasses

    from peftpick.knowledge import KnowledgeBase
    from peftpick.knowledge.architectures import resolve_model
    from peftpick.methods import build_candidate

    monkeypatch.chdir(tmp_path)
    kb = KnowledgeBase.load()
    arch = resolve_model(str(tiny_model_dir))
    candidate = build_candidate("pissa", arch, kb, rank=4)
    verdict = kb.serving_verdict("vllm", candidate, False)
    assert verdict.conversion == "initial-model" and verdict.rank_after == 8
    ranked = dataclasses.replace(sample_recommendation().ranked[0], candidate=candidate, serving=verdict)
    snippet = peft_snippet(ranked, str(tiny_model_dir))
    assert 'model.save_pretrained("adapter", path_initial_model_for_weight_conversion="adapter-init")' in snippet
    exec(compile(snippet, "<snippet>", "exec"), {})
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True


def test_snippet_rebuilds_every_catalogue_config(rec: Recommendation):
    """For each method the catalogue builds for a real architecture, the snippet's config equals the candidate's."""
    methods = pytest.importorskip("peftpick.methods")
    if not hasattr(methods, "candidates_for"):
        pytest.skip("the methods catalogue has no candidates_for")
    from peftpick.knowledge import KnowledgeBase
    from peftpick.knowledge.architectures import resolve_model

    kb = KnowledgeBase.load()
    candidates, _ = methods.candidates_for(resolve_model("smollm2-135m", kb.architectures), kb, None)
    assert candidates
    for candidate in candidates:
        snippet = peft_snippet(dataclasses.replace(rec.ranked[0], candidate=candidate), "org/model")
        namespace: dict = {}
        exec(compile(_adapter_section(snippet), f"<{candidate.method}>", "exec"), namespace)
        expected = candidate.peft_config()
        assert namespace.get("peft_config") == expected, candidate.method


@pytest.mark.parametrize("method", ["lora", "oft", "rslora"])
def test_snippet_config_lists_only_non_default_settings_and_builds_the_same_config(method):
    import peft

    from peftpick.knowledge import KnowledgeBase
    from peftpick.knowledge.architectures import resolve_model
    from peftpick.methods import candidates_for
    from peftpick.report.snippet import _config_call

    arch = resolve_model("llama-3.2-3b")
    candidate = candidates_for(arch, KnowledgeBase.load(), [method])[0][0]
    lines = _config_call(candidate.peft_config_class, candidate.peft_kwargs)
    assert not any("lora_dropout" in line or "bias=" in line for line in lines)  # PEFT's defaults
    namespace: dict = {}
    exec("\n".join(lines), vars(peft), namespace)  # noqa: S102 - the snippet's own code
    built, expected = namespace["peft_config"].to_dict(), candidate.peft_config().to_dict()
    built.pop("task_type"), expected.pop("task_type", None)
    assert built == expected
