"""Loss kernels and training loops of the traced step, and the planner's switch to Liger's fused loss."""

from __future__ import annotations

import pytest
from peft import LoraConfig
from transformers import GPT2Config, LlamaConfig
from typer.testing import CliRunner

import peftpick
from peftpick.cli import app
from peftpick.errors import PeftpickError
from peftpick.estimator import estimate, losses
from peftpick.recommender.planning import CONTEXT_RESERVE_BYTES
from peftpick.types import GIB

# a wide vocabulary on a small body, so the logits are most of the peak (as for Llama-3 on MetaMathQA)
CONFIG = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False)
LORA = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
SHAPE = dict(batch_size=4, seq_len=512)


def run(**kwargs):
    return estimate(CONFIG, LORA, **{**SHAPE, **kwargs})


def test_liger_chunk_size_follows_its_source():
    # the worked example in liger-kernel 0.8.5 ops/fused_linear_cross_entropy.py: BT = 4096*4, V = 32000,
    # H = 4096 gives inc_factor 8 and chunk_size 2048
    assert losses.liger_chunk_size(4096 * 4, 4096, 32000) == 2048
    assert losses.liger_chunk_size(100, 4096, 32000) == 16  # next power of two of ceil(100 / 8)
    assert losses.liger_chunk_size(3, 4096, 4096) == 3  # never more than the tokens


def test_liger_model_types_are_the_installed_packages():
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    types, source = losses.liger_model_types()
    assert types == frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN) and "installed" in source
    assert "llama" in types and "gpt2" not in types


def test_liger_source_is_parsed_once_per_file_version(tmp_path):
    from peftpick.estimator.liger_models import _types_in_source

    source = tmp_path / "monkey_patch.py"
    source.write_text('MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": f, "qwen2": g}\n')
    first = _types_in_source(str(source), source.stat().st_mtime_ns)
    hits = _types_in_source.cache_info().hits
    assert _types_in_source(str(source), source.stat().st_mtime_ns) == first == {"llama", "qwen2"}
    assert _types_in_source.cache_info().hits == hits + 1  # asked again: not parsed again
    source.write_text('MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": f}\n')
    import os

    os.utime(source, ns=(0, source.stat().st_mtime_ns + 1_000_000_000))  # a changed file is read again
    assert _types_in_source(str(source), source.stat().st_mtime_ns) == {"llama"}


def test_fused_losses_never_hold_the_full_logits():
    stock, liger, chunked = run(), run(loss="liger"), run(loss="chunked")
    logits = stock.breakdown["logits/loss"]
    full_logits = 4 * 512 * 32000 * 2  # one bf16 copy
    assert logits >= full_logits
    for fused in (liger, chunked):
        assert fused.breakdown.get("logits/loss", 0) == 0
        assert fused.peak_allocated_bytes < stock.peak_allocated_bytes - full_logits
    assert any("Liger's fused linear cross-entropy" in note for note in liger.assumptions)
    # Liger keeps the hidden states' gradient from forward to backward: at least 4 x 512 x 256 bf16
    assert liger.breakdown["activations"] >= run(loss="stock").breakdown["activations"] + 4 * 512 * 256 * 2 // 2


def test_trainer_loops_drop_the_output_before_backward():
    plain, hf = run(), run(trainer="hf")
    assert hf.peak_allocated_bytes < plain.peak_allocated_bytes
    assert any("transformers' Trainer" in note for note in hf.assumptions)
    trl = run(trainer="trl")  # SFTTrainer's fused LM head is the chunked loss
    assert trl.shape.loss == "chunked" and trl.breakdown.get("logits/loss", 0) == 0


def test_trl_quantizes_without_fp32_upcasts():
    pytest.importorskip("bitsandbytes")
    plain, trl = run(quant="4bit"), run(quant="4bit", trainer="trl")
    assert plain.breakdown["fp32 upcasts"] > 0
    assert trl.breakdown.get("fp32 upcasts", 0) == 0
    assert trl.breakdown["optimizer"] * 2 == plain.breakdown["optimizer"]  # bf16 adapter: half the AdamW state


def test_bad_loss_and_trainer_combinations_get_one_line(tmp_path):
    gpt2 = tmp_path / "gpt2.json"
    GPT2Config(n_layer=2, n_embd=64, n_head=2).to_json_file(gpt2)
    runner = CliRunner()
    result = runner.invoke(app, ["estimate", "--model", str(gpt2), "--method", "lora", "--loss", "liger"])
    assert result.exit_code == 2 and "Liger's kernels do not patch 'gpt2' models" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["estimate", "--model", str(gpt2), "--method", "lora", "--trainer", "trl",
                                 "--loss", "liger"])
    assert result.exit_code == 2 and "refuses Liger's" in result.output
    result = runner.invoke(app, ["--model", str(gpt2), "--vram", "24", "--loss", "liger"])
    assert result.exit_code == 2 and "do not patch 'gpt2'" in result.output
    result = runner.invoke(app, ["--model", "flux.2-klein-4b", "--vram", "24", "--trainer", "hf"])
    assert result.exit_code == 2 and "--loss and --trainer are for language models" in result.output
    with pytest.raises(PeftpickError, match="unknown loss 'fused'"):
        run(loss="fused")


def test_planner_switches_to_liger_when_the_stock_loss_needs_checkpointing(tmp_path):
    folder = tmp_path / "wide-vocab"
    folder.mkdir()
    CONFIG.to_json_file(folder / "config.json")
    big = dict(batch_size=8, seq_len=1024, gradient_checkpointing=False)  # a card of at least 1 GiB
    stock, liger = run(**big), run(**big, loss="liger")
    # a card on which the stock loss does not fit at the requested batch without checkpointing, Liger's does
    vram = (liger.peak_reserved_bytes + CONTEXT_RESERVE_BYTES) / 0.9 / GIB
    assert stock.peak_reserved_bytes + CONTEXT_RESERVE_BYTES > vram * GIB
    options = dict(vram_gb=vram, serve="none", methods=["lora"], seq_len=1024, batch_size=8, workers=1, probe=False)
    rec = peftpick.recommend(str(folder), **options)
    plan = rec.best.plan
    assert (plan.loss, plan.gradient_checkpointing, plan.micro_batch) == ("liger", False, 8)
    assert plan.loss_saving_bytes == stock.peak_reserved_bytes - liger.peak_reserved_bytes
    assert "Liger's fused cross-entropy" in rec.verdict and "checkpointing can stay off" in rec.verdict
    # with the loss fixed to stock the planner may not switch: here even checkpointing leaves the logits too big
    fixed = peftpick.recommend(str(folder), **options, loss="stock")
    assert fixed.best is None and [e.constraint for e in fixed.excluded] == ["memory"]
