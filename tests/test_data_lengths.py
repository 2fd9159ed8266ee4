"""--data shapes the estimate: the model's tokenizer measures the examples, the longest padded batch sets the
peak, and --packing fills rows instead."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import peftpick
from peftpick.cli import app
from peftpick.errors import PeftpickError

# 3 to 12 words each, and one of 30: one token a word plus the end-of-sequence token
TEXTS = [" ".join(["one"] * n) for n in range(3, 13)] * 3 + [" ".join(["two"] * 30)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lengths") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def recommend(model, **kwargs):
    return peftpick.recommend(str(model), vram_gb=8, serve="none", methods=["lora"], batch_size=2, workers=1,
                              probe=False, **kwargs)


def test_the_longest_example_sets_the_estimated_sequence(word_llama, data_file):
    rec = recommend(word_llama, data=data_file, seq_len=64)
    lengths = rec.lengths
    assert (lengths.examples, lengths.longest, lengths.median, lengths.over_seq_len) == (31, 31, 9, 0)
    assert rec.best.estimate.shape.seq_len == 31
    assert any("batches padded to their longest example" in note and "longest 31 tokens" in note
               for note in rec.assumptions)
    full = recommend(word_llama, seq_len=64)
    assert full.lengths is None and full.best.estimate.shape.seq_len == 64
    assert rec.best.estimate.peak_allocated_bytes < full.best.estimate.peak_allocated_bytes


def test_packing_fills_rows_and_truncation_is_counted(word_llama, data_file):
    packed = recommend(word_llama, data=data_file, seq_len=64, packing=True)
    assert packed.best.estimate.shape.seq_len == 64
    assert any("packed into full rows of 64 tokens" in note for note in packed.assumptions)
    short = recommend(word_llama, data=data_file, seq_len=16)
    assert short.lengths.over_seq_len == 1 and short.best.estimate.shape.seq_len == 16


def test_packing_needs_data_and_a_missing_tokenizer_is_said(word_llama, data_file):
    with pytest.raises(PeftpickError, match="--packing packs the examples of --data"):
        recommend(word_llama, packing=True)
    result = CliRunner().invoke(app, ["--model", str(word_llama), "--vram", "8", "--packing"])
    assert result.exit_code == 2 and "no --data was given" in result.output and "Traceback" not in result.output
    bundled = peftpick.recommend("smollm2-135m", vram_gb=8, serve="none", methods=["lora"], workers=1, probe=False,
                                 data=data_file)
    assert bundled.lengths is None
    assert any("tokenizer of smollm2-135m is not on this machine" in note for note in bundled.assumptions)
