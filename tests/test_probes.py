"""Probes on the CPU: worker isolation (errors, crashes, out-of-memory retries, timeouts), the cache, the loss
slope of a tiny model that learns, and `peftpick probe`.

Each probe runs in a real worker process (about 8 s of imports on a 2-core machine, overlapped two at a time);
failures are injected with the test-only PEFTPICK_PROBE_FAULTS variable the worker reads. The model is a tiny
random-weight Llama (hidden 64, one layer, 128 tokens) saved as a config.json folder, the way a user passes a
model; without a tokenizer the probe falls back to UTF-8 bytes.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

import peftpick
from peftpick.cli import app
from peftpick.errors import PeftpickError
from peftpick.probes import (
    ProbeOptions,
    ProbeWarning,
    cheaper_settings,
    fit_loss_slope,
    probe_to_estimate,
    result_from_dict,
    result_to_dict,
)
from peftpick.probes import runner as probe_runner
from peftpick.probes.cache import ProbeCache, default_cache_path
from peftpick.probes.job import FAULTS_ENV
from peftpick.types import ProbeResult, TrainingShape

SMALL = {"seq_len": 32, "batch_size": 2, "steps": 2, "random_weights": True, "device": "cpu", "progress": False}


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch) -> Path:
    """Every test gets its own probe cache, never the user's."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("PEFTPICK_CACHE_DIR", str(folder))
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    return folder / "probes.sqlite"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from peftpick.knowledge.architectures import build_config, resolve_model, tiny_overrides

    arch = resolve_model("llama-3.2-1b")
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_config(arch, **tiny_overrides(arch)).save_pretrained(folder)
    return folder


def faults(monkeypatch, **plans: dict) -> None:
    monkeypatch.setenv(FAULTS_ENV, json.dumps(plans))


class NoWorkers(Exception):
    pass


def forbid_workers(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise NoWorkers("a worker process was started")

    monkeypatch.setattr(probe_runner, "_Worker", refuse)


# ------------------------------------------------------------------------------------------- pure parts


def test_loss_slope_fit_recovers_a_known_line_and_its_error():
    assert fit_loss_slope([3.0, 2.5, 2.0, 1.5]) == pytest.approx((-0.5, 0.0), abs=1e-12)
    losses = [2.0, 1.9, 1.85, 1.6, 1.62, 1.4]
    slope, stderr = fit_loss_slope(losses)
    # closed form by hand: steps 0..5, mean 2.5, Sxx = 17.5
    mean = sum(losses) / 6
    expected = sum((t - 2.5) * (y - mean) for t, y in enumerate(losses)) / 17.5
    intercept = mean - expected * 2.5
    residual = sum((y - intercept - expected * t) ** 2 for t, y in enumerate(losses))
    assert slope == pytest.approx(expected) and slope < 0
    assert stderr == pytest.approx(math.sqrt(residual / 4 / 17.5))
    assert fit_loss_slope([2.0, 1.0]) == (-1.0, None)
    assert fit_loss_slope([2.0]) == (None, None)
    assert fit_loss_slope([2.0, math.nan, 1.0]) == (None, None)


def test_cheaper_settings_keep_the_effective_batch():
    settings = cheaper_settings(TrainingShape(batch_size=4, seq_len=128))
    assert [(s.batch_size, s.gradient_accumulation, s.gradient_checkpointing) for s in settings] == \
        [(4, 1, False), (4, 1, True), (2, 2, True), (1, 4, True)]
    odd = cheaper_settings(TrainingShape(batch_size=3, seq_len=128, gradient_checkpointing=True))
    assert [(s.batch_size, s.gradient_accumulation) for s in odd] == [(3, 1), (2, 2), (1, 3)]


def test_options_are_checked_before_anything_runs(tiny_model: Path, monkeypatch):
    forbid_workers(monkeypatch)
    for bad, words in (({"steps": 1}, "steps"), ({"seq_len": 1}, "sequence length"), ({"batch_size": 0}, "batch"),
                       ({"device": "tpu"}, "unknown device"), ({"timeout_s": -1}, "timeout"),
                       ({"learning_rate": 0.0}, "learning rate")):
        with pytest.raises(PeftpickError, match=words):
            peftpick.probe(tiny_model, ["lora"], **{**SMALL, **bad})
    with pytest.raises(PeftpickError, match="unknown method 'lorax'"):
        peftpick.probe(tiny_model, ["lora", "lorax"], **SMALL)
    with pytest.raises(PeftpickError, match="no such data file"):
        peftpick.probe(tiny_model, ["lora"], data=tiny_model / "absent.jsonl", **SMALL)
    with pytest.raises(PeftpickError, match="no weights"):
        peftpick.probe(tiny_model, ["lora"], **{**SMALL, "random_weights": False})
    with pytest.raises(PeftpickError, match="would take hours"):
        peftpick.probe("llama-3.2-3b", ["lora"], **SMALL)


def test_result_dict_round_trip_and_measured_estimate():
    shape = TrainingShape(batch_size=2, seq_len=64, gradient_checkpointing=True, gradient_accumulation=2)
    result = ProbeResult(method="lora", status="ok", shape=shape, device="NVIDIA H100 80GB HBM3",
                         peak_allocated_bytes=3 << 30, peak_reserved_bytes=4 << 30, nvml_used_bytes=5 << 30,
                         losses=(2.0, math.nan), trainable_params=10, total_params=100,
                         breakdown={"weights": 2 << 30, "grads, activations and temporaries": 1 << 30},
                         oom_settings=(TrainingShape(batch_size=4, seq_len=64),), requested_shape=shape,
                         notes=("a note",))
    data = json.loads(json.dumps(result_to_dict(result), allow_nan=False))
    assert data["losses"] == [2.0, None]
    back = result_from_dict(data)
    assert back.oom_settings == result.oom_settings and back.shape == shape and back.notes == ("a note",)
    assert math.isnan(back.losses[1])
    estimate = probe_to_estimate(result)
    assert estimate.source == "measured on NVIDIA H100 80GB HBM3"
    assert (estimate.peak_allocated_bytes, estimate.peak_reserved_bytes) == (3 << 30, 4 << 30)
    assert sum(estimate.breakdown.values()) == estimate.peak_allocated_bytes
    assert estimate.shape == shape and estimate.trainable_params == 10
    with pytest.raises(ValueError, match="measured no GPU memory"):
        probe_to_estimate(ProbeResult(method="lora", status="ok", shape=shape, device="cpu"))


# ------------------------------------------------------------------------------------------- the cache


def make_result(method: str = "lora") -> ProbeResult:
    return ProbeResult(method=method, status="ok", shape=TrainingShape(), device="cpu", losses=(2.0, 1.5, 1.0))


def test_cache_stores_and_serves_marked_results(private_cache: Path):
    with ProbeCache.open() as cache:
        assert cache.path == private_cache == default_cache_path()
        assert cache.get("k") is None
        cache.put("k", make_result(), {"why": "test"})
    with ProbeCache.open() as cache:
        served = cache.get("k")
    assert served == make_result().__class__(**{**make_result().__dict__, "from_cache": True})


def test_damaged_cache_file_is_moved_aside_and_rebuilt(private_cache: Path):
    private_cache.parent.mkdir(parents=True)
    private_cache.write_bytes(b"SQLite format 3\x00" + b"\x07" * 4000)  # a header, then garbage
    with pytest.warns(ProbeWarning, match="damaged"):
        cache = ProbeCache.open()
    with cache:
        cache.put("k", make_result(), {})
        assert cache.get("k") is not None and len(cache) == 1
    aside = [p for p in private_cache.parent.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes().endswith(b"\x07" * 100)


def test_cache_of_another_layout_is_not_trusted(private_cache: Path):
    private_cache.parent.mkdir(parents=True)
    with sqlite3.connect(private_cache) as other:
        other.execute("CREATE TABLE probes (key TEXT, result TEXT)")
        other.execute("INSERT INTO probes VALUES ('k', '{\"status\": \"ok\"}')")
    with pytest.warns(ProbeWarning, match="damaged or not peftpick's"):
        cache = ProbeCache.open()
    with cache:
        assert cache.get("k") is None and len(cache) == 0


def test_unreadable_row_is_dropped_not_served(private_cache: Path):
    with ProbeCache.open() as cache:
        cache.put("k", make_result(), {})
    with sqlite3.connect(private_cache) as raw:
        raw.execute("UPDATE probes SET result = '{\"schema_version\": 1, \"result\": {\"status\": \"maybe\"}}'")
    with ProbeCache.open() as cache, pytest.warns(ProbeWarning, match="unreadable"):
        assert cache.get("k") is None
    with ProbeCache.open() as cache:
        assert len(cache) == 0


# ------------------------------------------------------------------------------------------- real workers


def test_failing_workers_are_results_and_the_others_finish(tiny_model: Path, monkeypatch, private_cache: Path):
    """The recommender's path (run_probes with planned settings), real workers: IA3's raises at step 2, DoRA's
    runs out of memory until the micro-batch is 1; LoRA, probed after both, is untouched."""
    from peftpick.knowledge.architectures import resolve_model
    from peftpick.methods import build_candidate

    arch = resolve_model(tiny_model)
    candidates = [build_candidate(name, arch) for name in ("ia3", "dora", "lora")]
    planned = {"ia3": TrainingShape(batch_size=2, seq_len=32), "lora": TrainingShape(batch_size=2, seq_len=32),
               "dora": TrainingShape(batch_size=2, seq_len=32, gradient_checkpointing=True)}
    faults(monkeypatch, ia3={"kind": "error", "step": 2}, dora={"kind": "oom", "step": 1, "above_micro_batch": 1})
    options = ProbeOptions(steps=2, random_weights=True, device="cpu")
    ia3, dora, lora = probe_runner.run_probes(arch, candidates, planned, options, progress=False)

    assert ia3.status == "error" and ia3.error == "RuntimeError: simulated failure at step 2 (PEFTPICK_PROBE_FAULTS)"
    assert dora.status == "ok" and lora.status == "ok"
    # DoRA: the planned setting ran out of memory; half the micro-batch with two accumulation steps fits
    requested = TrainingShape(batch_size=2, seq_len=32, gradient_checkpointing=True, dtype="float32")
    assert dora.requested_shape == requested and dora.oom_settings == (requested,)
    assert (dora.shape.batch_size, dora.shape.gradient_accumulation, dora.shape.gradient_checkpointing) == (1, 2, True)
    assert dora.display_name == "DoRA" and dora.wall_seconds > 0

    for ok in (dora, lora):
        assert ok.device == "cpu" and ok.error is None
        assert len(ok.losses) == 3 and all(math.isfinite(loss) for loss in ok.losses)
        assert abs(ok.losses[0] - math.log(128)) < 0.5, "a random model starts near uniform over 128 tokens"
        assert ok.peak_allocated_bytes is None and ok.nvml_used_bytes is None  # not measured on the CPU
        assert ok.step_seconds > 0 and ok.loss_slope is not None
        assert 0 < ok.trainable_params < ok.total_params
        assert ok.versions["torch"] and ok.versions["peft"] and not ok.from_cache
        assert {"load", "warmup", "steps"} <= set(ok.phase_seconds)
    assert lora.tokens_per_second == pytest.approx(2 * 32 / lora.step_seconds)
    # r=32 on q_proj (64 -> 64) and v_proj (64 -> 16: one KV head of 16) of the one layer
    assert lora.trainable_params == 32 * (64 + 64) + 32 * (64 + 16)
    with ProbeCache.open() as cache:
        assert len(cache) == 2  # the two that finished; a failure is probed again next time


def test_tiny_model_learns_the_builtin_sample(tiny_model: Path):
    """Thirty optimizer steps of LoRA at a high learning rate on the built-in sample: the loss falls, and the fitted
    slope is negative by more than two standard errors."""
    (lora,) = peftpick.probe(tiny_model, ["lora"], seq_len=64, batch_size=4, steps=30, random_weights=True,
                             device="cpu", learning_rate=2e-2, progress=False)
    assert lora.status == "ok" and len(lora.losses) == 31 and lora.learning_rate == 2e-2
    assert lora.loss_slope + 2 * lora.loss_slope_stderr < 0, lora.losses
    assert sum(lora.losses[-5:]) / 5 < sum(lora.losses[:5]) / 5 - 0.1, lora.losses
    assert fit_loss_slope(lora.losses) == (lora.loss_slope, lora.loss_slope_stderr)
    assert "built-in arithmetic word problems" in lora.data
    assert any("UTF-8 bytes" in note for note in lora.notes)


# ------------------------------------------------------------------------------------------- the parent's side


@pytest.fixture
def stand_in(monkeypatch, tmp_path: Path) -> Path:
    """Run the protocol stand-in instead of the real worker; returns the file that logs its jobs."""
    monkeypatch.setattr(probe_runner, "WORKER_COMMAND", (str(Path(__file__).with_name("probe_stand_in_worker.py")),))
    log = tmp_path / "jobs.jsonl"
    monkeypatch.setenv("STAND_IN_LOG", str(log))
    return log


def jobs_run(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_crash_timeout_and_no_fitting_setting_are_results(tiny_model: Path, monkeypatch, stand_in: Path):
    monkeypatch.setenv("STAND_IN_PLAN", json.dumps({"ia3": {"kind": "crash"}, "dora": {"kind": "hang"},
                                                    "oft": {"kind": "oom"}}))
    ia3, dora, oft, lora = peftpick.probe(tiny_model, ["ia3", "dora", "oft", "lora"], **{**SMALL, "timeout_s": 1})
    assert ia3.status == "error"
    assert ia3.error.startswith("the worker process ended without a result (exit code 3)")
    assert "stand-in: about to crash" in ia3.error  # the worker's last output says what happened
    assert dora.status == "error" and dora.error == "timed out after 1 s at step 2 of 3; the worker was stopped"
    assert oft.status == "oom" and oft.error == "OutOfMemoryError: stand-in"
    ladder = cheaper_settings(TrainingShape(batch_size=2, seq_len=32, dtype="float32"))
    assert oft.oom_settings == tuple(ladder) and oft.shape == ladder[-1]
    assert lora.status == "ok" and lora.losses == pytest.approx((2.9, 2.8, 2.7))
    assert lora.loss_slope == pytest.approx(-0.1) and lora.loss_slope_stderr == pytest.approx(0.0, abs=1e-9)
    assert [job["method"] for job in jobs_run(stand_in)] == ["ia3", "dora", "oft", "oft", "oft", "lora"]
    with ProbeCache.open() as cache:
        assert len(cache) == 2  # OFT's "does not fit" and LoRA are results; a crash and a timeout are not


def test_ctrl_c_stops_the_worker_and_keeps_finished_probes(tiny_model: Path, monkeypatch, stand_in: Path):
    monkeypatch.setenv("STAND_IN_PLAN", json.dumps({"dora": {"kind": "hang"}}))

    def progress(message: str) -> None:
        if message.startswith("probing DoRA") and "step 1/" in message:
            raise KeyboardInterrupt  # what Ctrl-C raises in the parent while DoRA's worker runs

    with pytest.raises(probe_runner.ProbesInterrupted) as stopped:
        peftpick.probe(tiny_model, ["lora", "dora", "ia3"], **{**SMALL, "progress": progress, "timeout_s": 60})
    assert [r.method for r in stopped.value.results] == ["lora"] and stopped.value.results[0].status == "ok"
    assert [job["method"] for job in jobs_run(stand_in)] == ["lora", "dora"]
    forbid_workers(monkeypatch)
    (lora,) = peftpick.probe(tiny_model, ["lora"], **SMALL)
    assert lora.from_cache and lora.losses == stopped.value.results[0].losses


def test_cli_probe_measures_then_serves_from_the_cache(tiny_model: Path, monkeypatch, private_cache: Path,
                                                       tmp_path: Path, stand_in: Path):
    data = tmp_path / "train.csv"
    data.write_text("question,answer\n" + "".join(f"What is {i} + {i}?,{2 * i}\n" for i in range(40)))
    private_cache.parent.mkdir(parents=True)
    private_cache.write_text("not a database")  # a damaged cache must be replaced, not trusted
    runner = CliRunner()
    args = ["probe", "--model", str(tiny_model), "--methods", "ia3,prompt-tuning", "--random-weights",
            "--device", "cpu", "--seq-len", "32", "--batch-size", "2", "--steps", "2", "--data", str(data)]

    first = runner.invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.output
    document = json.loads(first.stdout)
    assert document["schema_version"] == 1 and document["interrupted"] is False
    assert [r["method"] for r in document["results"]] == ["ia3", "prompt-tuning"]
    assert all(r["status"] == "ok" and not r["from_cache"] for r in document["results"])
    assert all("'question'/'answer'" in r["data"] for r in document["results"])
    assert "damaged" in first.stderr
    assert any(".damaged-" in p.name for p in private_cache.parent.iterdir())
    assert len(jobs_run(stand_in)) == 2

    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert len(jobs_run(stand_in)) == 2, "the second run started no worker"
    assert second.stdout.count("cached") == 2  # "ok, cached" in both rows
    assert "2 of 2 result(s) came from the probe cache" in second.stdout
    assert "Memory: not measured on the CPU" in second.stdout

    forbid_workers(monkeypatch)
    again = runner.invoke(app, [*args, "--json"])
    cached = json.loads(again.stdout)["results"]
    assert [r["losses"] for r in cached] == [r["losses"] for r in document["results"]]
    assert all(r["from_cache"] for r in cached)
    # anything in the key changes: the cache is not used, a probe starts (and is refused here)
    for changed in (["--steps", "3"], ["--learning-rate", "0.5"], ["--seq-len", "16"], ["--grad-ckpt"],
                    ["--methods", "ia3,lora"], ["--data", str(data.with_suffix(".txt"))], ["--no-cache"]):
        if changed[0] == "--data":
            data.with_suffix(".txt").write_text("other text")
        result = runner.invoke(app, [*args, *changed])
        assert isinstance(result.exception, NoWorkers), (changed, result.output)


def test_cli_bad_probe_input_is_one_line_exit_2(tiny_model: Path, tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    (tmp_path / "x.docx").write_bytes(b"PK")
    runner = CliRunner()
    for args, words in ((["--data", str(empty)], "is empty"), (["--methods", "lorra"], "unknown method"),
                        (["--steps", "1"], "steps must be"), (["--data", str(tmp_path / "x.docx")], "unknown data format")):
        result = runner.invoke(app, ["probe", "--model", str(tiny_model), "--random-weights", "--device", "cpu", *args])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr


def test_methods_that_do_not_apply_are_reported_not_run(monkeypatch):
    from peftpick.methods import ArchitectureNotSupported

    def refuse(spec, arch, *args, **kwargs):
        raise ArchitectureNotSupported(f"{spec.display_name} cannot target {arch.name}")

    monkeypatch.setattr("peftpick.methods.build_candidate", refuse)
    forbid_workers(monkeypatch)
    (result,) = peftpick.probe("smollm2-135m", ["vera"], **SMALL)
    assert result.status == "error" and result.error == "not applicable: VeRA cannot target smollm2-135m"
