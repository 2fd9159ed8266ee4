"""Multi-GPU probes (probes.torchrun): the same code path as on GPUs, run here with 2 gloo processes on the CPU.
Both ranks report; a crash or an out-of-memory in one rank is reported, not hung."""

import json
import math
from pathlib import Path

import pytest

import peftpick
from peftpick.errors import PeftpickError
from peftpick.probes import torchrun
from peftpick.probes.job import FAULTS_ENV
from peftpick.probes.torchrun import check_gpus, combine

SMALL = {"seq_len": 32, "batch_size": 2, "steps": 2, "random_weights": True, "device": "cpu", "progress": False,
         "gpus": 2, "timeout_s": 120}


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PEFTPICK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(FAULTS_ENV, raising=False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from peftpick.knowledge.architectures import build_config, resolve_model, tiny_overrides

    arch = resolve_model("llama-3.2-1b")
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_config(arch, **tiny_overrides(arch, num_layers=2)).save_pretrained(folder)
    return folder


def test_two_ranks_train_with_fsdp2_and_both_report(tiny_model):
    (result,) = peftpick.probe(tiny_model, ["lora"], **SMALL)
    assert result.status == "ok", result.error
    assert result.gpus == 2 and [rank["rank"] for rank in result.ranks] == [0, 1]
    assert all(rank["status"] == "ok" for rank in result.ranks)
    assert len(result.losses) == 3 and all(math.isfinite(value) for value in result.losses)
    assert any("2 ranks, gloo, FSDP2" in note for note in result.notes)
    # the parameter counts are the model's (a sharded parameter counts its whole tensor), as on one process
    from peftpick.estimator import estimate

    single = estimate(str(tiny_model), "lora", batch_size=2, seq_len=32)
    assert result.trainable_params == single.trainable_params and result.total_params == single.total_params


def test_a_crash_in_one_rank_is_reported_not_hung(tiny_model, monkeypatch):
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"lora": {"kind": "crash", "step": 2, "rank": 1}}))
    (result,) = peftpick.probe(tiny_model, ["lora"], **SMALL)
    assert result.status == "error"
    assert "rank 1 wrote no result" in result.error
    assert result.wall_seconds < 120


def test_an_out_of_memory_in_one_rank_retries_a_cheaper_setting(tiny_model, monkeypatch):
    # rank 0 runs out of memory without checkpointing: the retry with checkpointing fits
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"lora": {"kind": "oom", "step": 1, "rank": 0,
                                                        "unless_checkpointing": True}}))
    (result,) = peftpick.probe(tiny_model, ["lora"], **SMALL)
    assert result.status == "ok" and result.shape.gradient_checkpointing
    assert len(result.oom_settings) == 1 and not result.oom_settings[0].gradient_checkpointing


def test_combine_takes_the_busiest_rank_and_names_the_failing_one():
    ok = {0: {"status": "ok", "peak_reserved": 5, "peak_allocated": 4, "tokens_per_second": 10.0, "backend": "nccl"},
          1: {"status": "ok", "peak_reserved": 7, "peak_allocated": 3, "tokens_per_second": 9.0}}
    message = combine(ok, 2, 0, False, 60)
    assert message["status"] == "ok" and message["peak_reserved"] == 7 and message["peak_allocated"] == 4
    assert message["busiest_rank"] == 1 and message["tokens_per_second"] == 19.0
    failed = combine({0: ok[0], 1: {"status": "oom", "error": "OutOfMemoryError: x"}}, 2, 1, False, 60)
    assert failed["status"] == "oom" and failed["error"] == "rank 1: OutOfMemoryError: x"
    assert combine({0: ok[0]}, 2, None, True, 60)["error"].startswith("timed out after 60 s on 2 ranks")
    # rank 0 stopped by torchrun after rank 1 died without a result: rank 1 is named
    stopped = {0: {"status": "stopped", "error": "stopped by torchrun"}}
    assert combine(stopped, 2, 1, False, 60)["error"].startswith("rank 1 wrote no result")


@pytest.mark.parametrize("gpus, words", [(0, "positive whole number"), ("two", "positive whole number"),
                                         (True, "positive whole number")])
def test_bad_gpus_are_refused(gpus, words):
    with pytest.raises(PeftpickError, match=words):
        check_gpus(gpus, "cpu")


def test_more_gpus_than_the_machine_has_are_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(PeftpickError, match="--gpus 4 is more than the 2 CUDA GPUs of this machine"):
        check_gpus(4, "cuda")
    assert check_gpus(2, "cuda") == 2
    with pytest.raises(PeftpickError, match="names one GPU"):
        check_gpus(2, "cuda:1")
    monkeypatch.setattr(torchrun.os, "cpu_count", lambda: 2)
    with pytest.raises(PeftpickError, match="more than its 2 cores"):
        check_gpus(3, "cpu")
