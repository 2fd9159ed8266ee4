"""benchmarks/measure_peaks.py runs on a GPU only for its figures; here its code runs on the CPU (`--device cpu`,
no memory figures) for every training stack, so that a GPU session spends its time measuring, not debugging."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("trl")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import measure_peaks  # noqa: E402


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("measure-peaks") / "config.json"
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128).to_json_file(path)
    return str(path)


@pytest.mark.parametrize("stack", ["plain", "nf4", "adamw-8bit", "hf", "trl", "nf4-trl"])
def test_every_stack_runs_its_training_steps(tiny_config, stack):
    row = measure_peaks.run_one(tiny_config, "lora-qv-r32", 2, 16, True, stack, device="cpu")
    if measure_peaks.STACKS[stack][3] == "plain":  # the plain loop counts what it trains
        assert 0 < row["trainable"] < row["total"]
    assert row["step_s"] is not None and row["step_s"] > 0
    if stack != "plain":
        quant, optimizer, loss, trainer = measure_peaks.STACKS[stack]
        assert (row["quant"], row["optimizer"], row["loss"], row["trainer"]) == (quant, optimizer, loss, trainer)


def test_command_line_writes_rows_and_records_failures(tiny_config, tmp_path):
    out = tmp_path / "rows.jsonl"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "measure_peaks.py"), "--device", "cpu", "--archs",
                           tiny_config, "--methods", "lora-qv-r32", "--stacks", "nf4-trl,liger", "--shapes", "2x16c",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row.get("stack") for row in rows] == ["nf4-trl", "liger"]
    assert "error" not in rows[0] and rows[0]["gpu"] == "cpu (dry run)"
    assert "active drivers" in rows[1]["error"]  # Liger's Triton kernels have no CPU driver: a row, not a crash
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "measure_peaks.py"), "--device", "cpu", "--stacks", "qlora"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown stack(s) qlora" in bad.stderr
