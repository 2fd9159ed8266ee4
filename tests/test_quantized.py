"""The traced QLoRA base against a real bitsandbytes model: a tiny Llama quantized on the CPU by
transformers' from_pretrained(quantization_config=...) and prepared by PEFT holds exactly the bytes the traced
breakdown states for quantized weights and float32 upcasts."""

from __future__ import annotations

import pytest

bnb = pytest.importorskip("bitsandbytes")

import torch  # noqa: E402
from peft import LoraConfig, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from peftpick.cli import app  # noqa: E402
from peftpick.errors import PeftpickError  # noqa: E402
from peftpick.estimator import estimate, quantized  # noqa: E402

# ten layers: the estimate traces a few and lengthens, so the quantization state must repeat with the layers
CONFIG = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=10, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False)
LORA = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-bf16")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIG, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def real_bytes(folder, quant: str) -> dict[str, int]:
    """Bytes a CPU-quantized, kbit-prepared model holds: quantized layers (packed weight and quantization
    state) and the parameters PEFT cast to float32."""
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantized.quantization_config(quant, torch.bfloat16), device_map="cpu",
        dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    seen: set[int] = set()

    def size(t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()

    quantized_bytes = upcast = 0
    for module in quantized.quantized_layers(model):
        quantized_bytes += size(module.weight) + sum(size(t) for t in quantized.quantization_state(module))
    for parameter in model.parameters():
        if parameter.dtype == torch.float32:
            upcast += size(parameter)
    buffers = sum(size(b) for b in model.buffers())
    return {"quantized weights": quantized_bytes, "fp32 upcasts": upcast, "weights": buffers}


@pytest.mark.parametrize("quant", ["4bit", "4bit-no-dq"])
def test_traced_4bit_base_holds_what_bitsandbytes_holds(saved_model, quant):
    traced = estimate(CONFIG, LORA, batch_size=2, seq_len=64, quant=quant)
    real = real_bytes(saved_model, quant)
    assert real["quantized weights"] > 0 and real["fp32 upcasts"] > 0
    assert traced.breakdown["quantized weights"] == real["quantized weights"]
    assert traced.breakdown["fp32 upcasts"] == real["fp32 upcasts"]
    # every frozen weight is quantized or upcast: "weights" holds the buffers only (rotary frequencies)
    assert traced.breakdown["weights"] == real["weights"] < 1024
    assert any("traced" in note and "bitsandbytes" in note for note in traced.assumptions)
    assert traced.total_params == estimate(CONFIG, LORA, batch_size=2, seq_len=64).total_params  # not packed pairs
    assert list(traced.breakdown)[:3] == ["weights", "quantized weights", "fp32 upcasts"]


def test_double_quantization_and_4bit_shrink_the_base():
    plain = estimate(CONFIG, LORA, batch_size=2, seq_len=64)
    nf4 = estimate(CONFIG, LORA, batch_size=2, seq_len=64, quant="4bit-no-dq")
    nf4_dq = estimate(CONFIG, LORA, batch_size=2, seq_len=64, quant="4bit")
    linear = 10 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 688)  # q, o, k, v, gate, up, down per layer
    # NF4: half a byte per weight plus a float32 absmax per 64; double quantization an 8-bit absmax instead
    assert nf4.breakdown["quantized weights"] >= linear // 2 + 4 * linear // 64
    assert nf4_dq.breakdown["quantized weights"] < nf4.breakdown["quantized weights"]
    assert nf4_dq.breakdown["quantized weights"] < plain.breakdown["weights"] / 3


def test_forward_dequantizes_above_the_fused_gemm_limit():
    """bitsandbytes' CUDA gemm_4bit: up to FUSED_GEMM_MAX_TOKENS rows the fused kernel (no buffer), above it
    the fallback's float32 absmax pair (double quantization) and the whole weight in the input dtype."""
    gemm = torch.ops.bitsandbytes.gemm_4bit.default
    limit = quantized.FUSED_GEMM_MAX_TOKENS

    def activations(tokens):
        return torch.empty(1, tokens, 256, device="meta", dtype=torch.bfloat16)

    absmax_8bit = torch.empty(688 * 256 // 64, dtype=torch.uint8, device="meta")
    assert quantized.dequantization_temporaries(gemm, (activations(limit), None, [688, 256]), {}) is None
    assert quantized.dequantization_temporaries(gemm, (activations(limit + 1), None, [688, 256]), {}) == [
        (688 * 256 * 2, "dequantization")]
    assert quantized.dequantization_temporaries(
        gemm, (activations(limit + 1), None, [688, 256]), {"absmax_8bit": absmax_8bit}) == [
        (688 * 256 // 64 * 4, "dequantization")] * 2 + [(688 * 256 * 2, "dequantization")]
    assert quantized.dequantization_temporaries(torch.ops.aten.mm.default, (), {}) is None


def test_backward_dequantization_is_traced():
    """Backward dequantizes every frozen 4-bit weight (bitsandbytes::dequantize_4bit, traced): with the peak
    in backward (checkpointing, a short sequence) the dequantized weight is part of it."""
    result = estimate(CONFIG, LORA, batch_size=1, seq_len=16, gradient_checkpointing=True, quant="4bit")
    assert 0 < result.breakdown.get("dequantization", 0) <= 2 * 688 * 256 * 2 + 4 * 688 * 256 // 64


def test_full_fine_tuning_of_a_quantized_base_is_refused():
    with pytest.raises(PeftpickError, match="full fine-tuning cannot train a 4bit quantized base"):
        estimate(CONFIG, "full", quant="4bit")


def test_8bit_is_modelled_and_says_why():
    result = estimate(CONFIG, LORA, batch_size=2, seq_len=64, quant="8bit")
    assert any("modelled" in note and "outlier" in note for note in result.assumptions)


def test_cli_estimate_quant(tmp_path):
    config = tmp_path / "config.json"
    CONFIG.to_json_file(config)
    runner = CliRunner()
    ok = runner.invoke(app, ["estimate", "--model", str(config), "--method", "lora", "--quant", "4bit",
                             "--batch-size", "1", "--seq-len", "32"])
    assert ok.exit_code == 0, ok.output
    assert "quantized weights" in ok.output and "fp32 upcasts" in ok.output
    bad = runner.invoke(app, ["estimate", "--model", str(config), "--method", "full", "--quant", "4bit"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "full fine-tuning cannot train" in bad.output
    unknown = runner.invoke(app, ["estimate", "--model", str(config), "--method", "lora", "--quant", "3bit"])
    assert unknown.exit_code == 2 and "unknown quantization '3bit'" in unknown.output


def test_qlora_on_8_gib_points_at_the_loop_that_fits():
    """Llama-3.1-8B QLoRA on 8 GiB: with PEFT's k-bit preparation (3.9 GiB of float32 embeddings and output
    head) nothing fits, and the exclusion says which loop would; under TRL's SFTTrainer it fits."""
    import peftpick

    options = dict(vram_gb=8, serve="vllm", quant="4bit", methods=["lora"], workers=1, probe=False)
    plain = peftpick.recommend("llama-3.1-8b", **options)
    assert plain.best is None
    reason = next(e.reason for e in plain.excluded if e.method == "lora")
    assert "--trainer trl" in reason and "3.9 GiB of float32" in reason
    trl = peftpick.recommend("llama-3.1-8b", trainer="trl", **options)
    assert trl.best is not None and trl.best.plan.fit == "fits"
    assert "fp32 upcasts" not in trl.best.estimate.breakdown
    assert trl.best.estimate.breakdown["quantized weights"] > 3 * 2**30
