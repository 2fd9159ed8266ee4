"""The estimate cache: a repeated recommendation traces nothing, reads back the same figures, and never trusts a
damaged file or a row it cannot read; keys change with what an estimate depends on, not with where a model was
read from."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import peftpick
import peftpick.recommender.planning as planning
from peftpick.errors import PeftpickError
from peftpick.estimator.cache import CACHE_FILE_NAME, EstimateCache, EstimateWarning
from peftpick.knowledge.architectures import load_registry, resolve_model
from peftpick.types import MemoryEstimate, TrainingShape

SHAPE = TrainingShape(batch_size=2, seq_len=64, gradient_checkpointing=True, optimizer="adamw", loss="liger")
ESTIMATE = MemoryEstimate(peak_allocated_bytes=123_456_789, peak_reserved_bytes=130_023_424,
                          breakdown={"weights": 100_000_000, "adapter": 3_456_789, "activations": 20_000_000},
                          trainable_params=1_728_394, total_params=50_000_000, shape=SHAPE,
                          adapter_file_bytes=6_913_576, assumptions=("one", "two"), source="estimated")


@pytest.fixture()
def cache_path(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("PEFTPICK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / CACHE_FILE_NAME


def test_outcomes_read_back_exactly(cache_path: Path):
    arch = resolve_model("smollm2-135m")
    with EstimateCache.open() as cache:
        key, parts = cache.key(arch, ("LoraConfig", (("r", "16"),), "adamw"), SHAPE)
        cache.put(key, ESTIMATE, parts, arch.name)
        error = PeftpickError("WaveFT cannot be estimated: it selects weights from data", "probe it instead")
        cache.put("failed", error, {}, arch.name)
    with EstimateCache.open() as cache:
        assert cache.path == cache_path and len(cache) == 2
        assert cache.get(key) == ESTIMATE
        back = cache.get("failed")
        assert isinstance(back, PeftpickError) and (back.problem, back.fix) == (error.problem, error.fix)
        assert cache.get("absent") is None


def test_keys_follow_what_an_estimate_depends_on(cache_path: Path):
    arch = resolve_model("smollm2-135m")
    signature = ("LoraConfig", (("r", "16"),), "adamw")
    with EstimateCache.open() as cache:
        key = cache.key(arch, signature, SHAPE)[0]
        # where the model came from does not matter; accumulation does not change a step's peak
        assert cache.key(dataclasses.replace(arch, source="a folder", local_path="/x", hub_id=None), signature,
                         dataclasses.replace(SHAPE, gradient_accumulation=8))[0] == key
        others = [cache.key(arch, ("LoraConfig", (("r", "32"),), "adamw"), SHAPE)[0],
                  cache.key(arch, signature, dataclasses.replace(SHAPE, batch_size=4))[0],
                  cache.key(arch, signature, dataclasses.replace(SHAPE, loss="stock"))[0],
                  cache.key(dataclasses.replace(arch, hidden_size=arch.hidden_size * 2), signature, SHAPE)[0]]
        assert len({key, *others}) == 5
        versions = cache.key(arch, signature, SHAPE)[1]["versions"]
        assert versions["torch"] and versions["peft"] and versions["transformers"]


def test_damaged_file_is_moved_aside_and_rebuilt(cache_path: Path):
    cache_path.parent.mkdir(parents=True)
    cache_path.write_bytes(b"SQLite format 3\x00" + b"\x07" * 4000)
    with pytest.warns(EstimateWarning, match="damaged or not peftpick's.*traced again"):
        cache = EstimateCache.open()
    with cache:
        cache.put("k", ESTIMATE, {}, "m")
        assert cache.get("k") == ESTIMATE
    assert [p.name for p in cache_path.parent.iterdir() if ".damaged-" in p.name]


def test_unreadable_row_is_dropped_not_served(cache_path: Path):
    with EstimateCache.open() as cache:
        cache.put("k", ESTIMATE, {}, "m")
    with sqlite3.connect(cache_path) as raw:
        raw.execute("UPDATE estimates SET value = '{\"format\": 1, \"estimate\": {\"peak\": 3}}'")
    with EstimateCache.open() as cache, pytest.warns(EstimateWarning, match="unreadable"):
        assert cache.get("k") is None
    with EstimateCache.open() as cache:
        assert len(cache) == 0


def test_a_repeated_recommendation_traces_nothing_and_gives_the_same_plans(cache_path: Path, monkeypatch):
    traced = []
    real = planning._default_estimator

    def counting(*job):
        traced.append(job[2])
        return real(*job)

    monkeypatch.setattr(planning, "_default_estimator", counting)
    kwargs = dict(vram_gb=2, serve="vllm", methods=["lora", "ia3", "full"], seq_len=256, workers=1,
                  probe=False)
    first = peftpick.recommend("smollm2-135m", **kwargs)
    assert traced, "the first run must trace"
    count = len(traced)
    second = peftpick.recommend("smollm2-135m", **kwargs)
    assert len(traced) == count  # every estimate came from the cache

    def plans(rec):
        return {r.method: (r.plan.micro_batch, r.plan.gradient_checkpointing, r.estimate.peak_reserved_bytes,
                           r.estimate.breakdown, r.estimate.shape) for r in rec.ranked}

    assert plans(second) == plans(first) and [e.reason for e in second.excluded] == [e.reason for e in first.excluded]
    peftpick.recommend("smollm2-135m", cache=False, **kwargs)
    assert len(traced) == 2 * count  # cache=False traces again
    with EstimateCache.open() as cache:
        assert len(cache) == count and len(cache.architectures) >= 1


def test_bundled_names_resolve_from_the_cache_without_transformers(cache_path: Path, monkeypatch):
    registry = load_registry()
    with EstimateCache.open() as cache:
        cached = registry.with_cache(cache.architectures)
        first = resolve_model("llama-3.2-1b", cached)
        import transformers

        def refuse(*args, **kwargs):
            raise AssertionError("transformers was asked again")

        monkeypatch.setattr(transformers.AutoConfig, "for_model", refuse)
        again = resolve_model("llama-3.2-1b", cached)
    assert again == first and again.config == first.config and again.source == first.source


def test_cli_no_cache_writes_nothing(cache_path: Path):
    from typer.testing import CliRunner

    from peftpick.cli import app

    result = CliRunner().invoke(app, ["--model", "smollm2-135m", "--vram", "8", "--methods", "lora", "--seq-len",
                                      "128", "--no-probe", "--no-cache"])
    assert result.exit_code == 0, result.output
    assert not cache_path.exists()
    result = CliRunner().invoke(app, ["--model", "smollm2-135m", "--vram", "8", "--methods", "lora", "--seq-len",
                                      "128", "--no-probe"])
    assert result.exit_code == 0, result.output
    with EstimateCache.open() as cache:
        assert len(cache) >= 1
