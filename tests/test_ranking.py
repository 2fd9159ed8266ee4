"""Ranking: hard constraints case by case, the Pareto front on a hand-made table, the --goal utility, and probe
figures (fabricated GPU measurements) replacing estimates in a recommendation."""

from __future__ import annotations

import dataclasses

import pytest

import peftpick
from peftpick.knowledge import KnowledgeBase
from peftpick.knowledge.architectures import resolve_model
from peftpick.methods import build_candidate, get_method
from peftpick.recommender import _constraint_violation
from peftpick.recommender.planning import fit_of
from peftpick.recommender.ranking import Assessed, dominates, pareto_front, rank
from peftpick.types import (
    GIB,
    Candidate,
    Goal,
    MemoryEstimate,
    ProbeResult,
    QualityPrediction,
    Quant,
    Request,
    Serve,
    ServingVerdict,
    TrainingPlan,
    TrainingShape,
)


@pytest.fixture(scope="module")
def kb():
    return KnowledgeBase.load()


@pytest.fixture(scope="module")
def llama(kb):
    return resolve_model("llama-3.2-3b", kb.architectures)


def candidate_of(kb, arch, method: str) -> Candidate:
    return build_candidate(get_method(method), arch)


# ------------------------------------------------------------------------------------ hard constraints


@pytest.mark.parametrize("method, serve, multi_adapter, quant, constraint", [
    ("lora", "vllm", False, "none", None),
    ("lora", "vllm", True, "none", None),  # LoRA hot-swaps on vLLM
    ("dora", "vllm", False, "none", None),  # vLLM rejects DoRA adapters, but the merged model serves
    ("dora", "vllm", True, "none", "multi-adapter"),  # merging rules out many adapters over one base
    ("oft", "sglang", True, "none", "multi-adapter"),
    ("lily", "vllm", False, "none", "serving"),  # cannot be merged nor converted, and vLLM cannot load it
    ("lily", "none", False, "none", None),  # no serving stack: nothing to load it into
    ("prompt-tuning", "vllm", False, "none", "serving"),
    ("full", "vllm", True, "none", "multi-adapter"),  # a whole model is not an adapter to swap
    ("full", "vllm", False, "4bit", "quantization"),  # a quantized base cannot hold updated weights
    ("lora", "vllm", False, "4bit", None),  # QLoRA
    ("ia3", "none", False, "8bit", None),
])
def test_constraints_case_by_case(kb, llama, method, serve, multi_adapter, quant, constraint):
    request = Request(model="llama-3.2-3b", vram_gib=24, serve=Serve(serve), multi_adapter=multi_adapter,
                      quant=Quant(quant))
    verdict = _constraint_violation(candidate_of(kb, llama, method), request, kb)
    if constraint is None:
        assert verdict is None, verdict.reason
    else:
        assert verdict is not None and verdict.constraint == constraint
        assert verdict.reason.startswith(candidate_of(kb, llama, method).display_name)


def test_methods_without_bitsandbytes_support_are_excluded_under_quantization(kb, llama):
    request = Request(model="llama-3.2-3b", vram_gib=24, serve=Serve.NONE, quant=Quant.INT4)
    unsupported = [method for method in ("lora", "loha", "lokr", "vera", "oft", "boft", "ia3", "shira", "hira")
                   if kb.capabilities_of(candidate_of(kb, llama, method).peft_type).supports_quantization("bnb_4bit")
                   is False]
    assert unsupported, "the capability table should know methods without 4-bit support"
    for method in unsupported:
        verdict = _constraint_violation(candidate_of(kb, llama, method), request, kb)
        assert verdict is not None and verdict.constraint == "quantization" and "bitsandbytes" in verdict.reason


@pytest.mark.parametrize("reserved_gib, fit", [(10.0, "fits"), (14.6, "fits"), (15.0, "marginal"), (15.5, "does not fit")])
def test_fit_keeps_a_stated_margin(reserved_gib, fit):
    # 16 GiB: "fits" needs peak reserved + the 0.6 GiB context reserve within 95 % of it (15.2 GiB)
    estimate = MemoryEstimate(int(reserved_gib * GIB), int(reserved_gib * GIB), {}, 0, 0, TrainingShape())
    assert fit_of(estimate, 16) == fit


# ------------------------------------------------------------------------------------ Pareto front and utility


def item(name: str, quality: float, peak_gib: float, speed: float, adapter_mib: float,
         non_learning: str | None = None) -> Assessed:
    shape = TrainingShape()
    estimate = MemoryEstimate(int(peak_gib * GIB), int(peak_gib * GIB), {}, 1, 100, shape,
                              adapter_file_bytes=int(adapter_mib * 2**20))
    plan = TrainingPlan(4, 1, False, estimate, "fits")
    candidate = Candidate(name, name.upper(), "LORA", "LoraConfig", {"r": 8})
    return Assessed(candidate, plan, ServingVerdict("native", "loads"), None,
                    QualityPrediction(quality, quality - 0.03, quality + 0.03, "hand-made", non_learning=non_learning),
                    speed, "hand-made", full_model_bytes=6 * GIB)


TABLE = [
    # name, quality x LoRA, peak GiB, speed x LoRA, adapter MiB
    ("lora", 1.00, 12.0, 1.00, 35),
    ("dora", 0.98, 12.5, 0.60, 36),  # dominated by lora on every axis
    ("rslora", 1.07, 12.6, 0.75, 70),  # best quality: on the front
    ("lorafa", 0.84, 10.0, 0.95, 35),  # least memory: on the front
    ("ia3", 0.95, 12.0, 1.00, 2),  # smallest adapter: on the front
    ("loha", 0.82, 12.9, 0.50, 70),  # dominated by lora, dora, rslora ...
    ("near-lora", 1.005, 12.05, 1.00, 35),  # within every axis' resolution of lora: neither dominates the other
]


def test_pareto_front_on_a_hand_made_table():
    items = [item(*row) for row in TABLE]
    from peftpick.recommender.ranking import axis_values

    dominators = pareto_front({i.candidate.method: axis_values(i) for i in items})
    front = {name for name, by in dominators.items() if not by}
    assert front == {"lora", "rslora", "lorafa", "ia3", "near-lora"}
    assert set(dominators["dora"]) == {"lora", "near-lora"}
    assert {"lora", "dora", "rslora"} <= set(dominators["loha"])


def test_dominance_needs_a_difference_beyond_the_resolution():
    assert dominates((2.5, 1.0), (1.0, 1.0))
    assert not dominates((1.5, 1.0), (1.0, 1.0))  # half a resolution step: the same
    assert not dominates((3.0, 0.0), (1.0, 2.0))  # better on one, worse on the other


def test_front_is_listed_before_dominated_candidates():
    ranked = rank([item(*row) for row in TABLE], Goal.BALANCED, 16)
    flags = [r.pareto for r in ranked]
    assert flags == sorted(flags, reverse=True)  # every front member before every dominated one
    dora = next(r for r in ranked if r.method == "dora")
    assert set(dora.dominated_by) == {"LORA", "NEAR-LORA"} and "dominated by" in dora.reason


def test_goal_memory_and_goal_quality_reorder():
    items = [item(*row) for row in TABLE]
    by_quality = [r.method for r in rank(items, Goal.QUALITY, 16)]
    by_memory = [r.method for r in rank(items, Goal.MEMORY, 16)]
    assert by_quality[0] == "rslora"
    assert by_memory[0] == "lorafa"
    assert by_quality.index("lorafa") > by_quality.index("rslora")
    assert by_memory.index("rslora") > by_memory.index("lorafa")
    by_speed = [r.method for r in rank([item(*row) for row in TABLE if row[0] in ("rslora", "lorafa", "ia3")],
                                       Goal.SPEED, 16)]
    assert by_speed[0] == "ia3"


def test_a_method_whose_probe_loss_does_not_fall_is_ranked_last_whatever_its_benchmark_says():
    items = [item(*row) for row in TABLE]
    items[2] = item("rslora", 1.07, 12.6, 0.75, 70, non_learning="the probe loss does not fall")
    ranked = rank(items, Goal.QUALITY, 16)
    assert ranked[-1].method == "rslora"
    assert ranked[-1].flags and "does not fall" in ranked[-1].reason


# ------------------------------------------------------------------------------------ probes in a recommendation


SMALL = {"model": "smollm2-135m", "seq_len": 64, "batch_size": 2, "workers": 1}


def fabricated_probes(results_by_method):
    """A stand-in for run_probes that returns GPU measurements made up for the test."""
    calls = []

    def run_probes(arch, candidates, shapes, options, progress=None):
        calls.append({"methods": [c.method for c in candidates], "shapes": shapes, "options": options})
        return [results_by_method[c.method](shapes[c.method].estimate.shape) for c in candidates]

    return run_probes, calls


def ok(peak_gib: float, losses, step_seconds: float = 0.2):
    def make(shape: TrainingShape) -> ProbeResult:
        return ProbeResult(method="", status="ok", shape=shape, device="NVIDIA H100 80GB HBM3",
                           peak_allocated_bytes=int(peak_gib * 0.9 * GIB), peak_reserved_bytes=int(peak_gib * GIB),
                           step_seconds=step_seconds, losses=tuple(losses), trainable_params=1000, total_params=10**8)
    return make


def with_method(make, method):
    return lambda shape: dataclasses.replace(make(shape), method=method)


FALLING = [2.0 - 0.1 * step for step in range(11)]
FLAT = [2.0, 2.01, 1.99, 2.02, 1.98, 2.0, 2.01, 1.99, 2.02, 2.0, 2.01]


def test_probe_figures_replace_estimates_and_an_out_of_memory_excludes(monkeypatch):
    results = {
        "lora": with_method(ok(3.0, FALLING, 0.20), "lora"),
        "rslora": with_method(ok(3.1, FLAT, 0.22), "rslora"),  # its loss does not fall on the user's data
        "ia3": with_method(ok(2.5, FALLING, 0.10), "ia3"),
        "dora": lambda shape: ProbeResult(method="dora", status="oom", shape=shape, device="NVIDIA H100 80GB HBM3"),
    }
    run_probes, calls = fabricated_probes(results)
    monkeypatch.setattr("peftpick.probes.runner.run_probes", run_probes)
    monkeypatch.setattr("peftpick.probes.runner.weights_source", lambda arch, random_weights: ("/weights", True))
    rec = peftpick.recommend(**SMALL, vram_gb=8, serve="none", methods=["lora", "rslora", "ia3", "dora"], probe=True,
                             probe_steps=10)
    assert calls[0]["methods"][0] == "lora"  # the reference is probed first
    assert calls[0]["options"].steps == 10 and not calls[0]["options"].random_weights
    assert rec.gpu == "NVIDIA H100 80GB HBM3"
    by_method = {r.method: r for r in rec.ranked}
    assert by_method["lora"].estimate.source == "measured on NVIDIA H100 80GB HBM3"
    assert by_method["lora"].estimate.peak_reserved_bytes == int(3.0 * GIB)
    assert by_method["ia3"].relative_speed == pytest.approx(2.0)  # 0.20 s / 0.10 s per step, measured
    assert by_method["ia3"].speed_source.startswith("measured on")
    assert rec.ranked[-1].method == "rslora" and rec.ranked[-1].flags  # flagged, ranked down
    dora = {e.method: e for e in rec.excluded}["dora"]
    assert dora.constraint == "memory" and "measured by a probe" in dora.reason
    assert len(rec.probes) == 4
    text = rec.report("text")
    assert "measured on NVIDIA H100 80GB HBM3" in text and "does not fall" in text


def test_no_probe_without_a_gpu_unless_asked(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("probed without being asked on a machine without a GPU")

    monkeypatch.setattr("peftpick.probes.runner.run_probes", refuse)
    rec = peftpick.recommend(**SMALL, vram_gb=8, serve="none", methods=["lora", "ia3"])
    assert rec.probes == () and rec.gpu is None
    assert all(r.estimate.source == "estimated" for r in rec.ranked)


def test_goal_weights_and_uncertainty_are_in_the_recommendation():
    rec = peftpick.recommend(**SMALL, vram_gb=8, serve="none", goal="memory",
                             methods=["lora", "rslora", "hira", "shira", "ia3"])
    assert rec.goal_weights == {"quality": 0.2, "memory": 0.7, "speed": 0.05, "size": 0.05}
    assert any("--goal memory" in line and "memory 0.7" in line for line in rec.assumptions)
    # rsLoRA, HiRA and SHiRA score within each other's intervals on MetaMathQA: the report must say so
    assert rec.uncertainty and "rsLoRA" in rec.uncertainty[0] and "settles it" in rec.uncertainty[0]
    assert "Uncertainty:" in rec.report("markdown")


def test_recommendation_probes_on_the_cpu_when_asked(tmp_path, monkeypatch):
    """A real (tiny, config-only) model probed on the CPU: no weights, so random weights measure speed and loss,
    the losses do not feed the quality model, and memory stays estimated."""
    from peftpick.knowledge.architectures import build_config, tiny_overrides

    monkeypatch.setenv("PEFTPICK_CACHE_DIR", str(tmp_path / "cache"))
    arch = resolve_model("llama-3.2-1b")
    folder = tmp_path / "tiny-llama"
    build_config(arch, **tiny_overrides(arch)).save_pretrained(folder)
    rec = peftpick.recommend(folder, vram_gb=8, serve="none", seq_len=32, batch_size=2, methods=["ia3", "lora"],
                             probe=True, probe_steps=2, probe_device="cpu", workers=1)
    assert [p.method for p in rec.probes] == ["lora", "ia3"]  # LoRA first: the reference
    assert all(p.status == "ok" and p.device == "cpu" and len(p.losses) == 3 for p in rec.probes), rec.probes
    assert rec.gpu is None and all(r.estimate.source == "estimated" for r in rec.ranked)
    assert any("probes ran on cpu" in line for line in rec.assumptions)
    assert all(r.probe is not None and not r.quality.used_probe for r in rec.ranked)
