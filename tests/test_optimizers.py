"""Optimizers of the traced training step: their state bytes, figure by figure, on a tiny Llama on the CPU.

The 8-bit optimizers run two ways: bitsandbytes' own classes where it imports, and the model of its source
where it does not (the import blocked here); both must give the same bytes.
"""

from __future__ import annotations

import sys

import pytest
from peft import LoraConfig
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

from peftpick.cli import app
from peftpick.errors import PeftpickError
from peftpick.estimator import estimate, optimizers

LAYERS = 10


def small_llama(layers: int = LAYERS) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def config() -> LlamaConfig:
    return small_llama()


def lora16() -> LoraConfig:
    # r=16 on q_proj (256 -> 256) and v_proj (256 -> 128): A of q and v and B of q have 4096 elements (8-bit
    # state in bitsandbytes), B of v has 128 x 16 = 2048 (< min_8bit_size 4096: float32 state).
    return LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


LORA_SHAPES = [(16, 256), (256, 16), (16, 256), (128, 16)] * LAYERS  # lora_A/B of q_proj, v_proj per layer
TRAINABLE = sum(r * c for r, c in LORA_SHAPES)
QMAPS = 2 * 256 * 4  # bitsandbytes' two float32 quantization maps, shared


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def eight_bit(numel: int) -> int:
    return 8 * numel if numel < 4096 else 2 * numel + 2 * 4 * _ceil(numel, 256)


def adafactor(shape: tuple[int, ...]) -> int:
    rms = 4  # the 0-dim float32 RMS kept per parameter
    if len(shape) >= 2:
        return 4 * (shape[-2] + shape[-1]) + rms  # float32 row and column second moments
    return 4 * shape[0] + rms


def _run(config, adapter, optimizer, **kwargs):
    return estimate(config, adapter, **{"batch_size": 2, "seq_len": 128, "optimizer": optimizer, **kwargs})


def _optimizer_line(est) -> str:
    lines = [a for a in est.assumptions if a.startswith("optimizer:")]
    assert len(lines) == 1, est.assumptions
    return lines[0]


@pytest.fixture
def without_bitsandbytes(monkeypatch):
    """Make `import bitsandbytes` fail, as on a machine without it."""
    for name in [n for n in sys.modules if n == "bitsandbytes" or n.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert optimizers.bitsandbytes_version() is None


# ------------------------------------------------------------------------------------------ state bytes


def test_the_figures_the_tests_use():
    assert TRAINABLE == 143_360
    assert sum(eight_bit(r * c) for r, c in LORA_SHAPES) + QMAPS == 10 * (3 * 8_320 + 16_384) + 2_048 == 415_488
    assert sum(adafactor(s) for s in LORA_SHAPES) == 10 * (3 * 1_092 + 580) == 38_560


@pytest.mark.parametrize("name, state", [
    ("adamw", 8 * TRAINABLE),  # exp_avg + exp_avg_sq, float32 like the adapters: 1,146,880
    ("sgd", 4 * TRAINABLE),  # one momentum buffer: 573,440
    ("adafactor", 38_560),  # factored rows + columns (+ RMS) for every 2-D LoRA matrix
    ("adamw-8bit", 415_488),  # 2 B + 8/256 B per element for the 4096-element matrices, 8 B for v's B, + maps
    ("paged-adamw-8bit", 415_488),  # same tensors; none has 1e5 elements, so nothing is paged
])
def test_optimizer_state_bytes_for_a_lora_adapter(config, name, state):
    est = _run(config, lora16(), name)
    assert est.trainable_params == TRAINABLE
    assert est.breakdown["optimizer"] == state  # the peak (in backward) holds the whole state, nothing else
    assert f"optimizer state {state:,} bytes" in _optimizer_line(est)


def test_smaller_state_gives_a_lower_peak_by_the_state_difference(config):
    adamw, sgd = _run(config, lora16(), "adamw"), _run(config, lora16(), "sgd")
    assert adamw.peak_allocated_bytes - sgd.peak_allocated_bytes >= 4 * TRAINABLE - 512 * len(LORA_SHAPES)


def test_assumptions_name_the_optimizer(config):
    assert "torch AdamW" in _optimizer_line(_run(config, lora16(), "adamw"))
    assert "SGD" in _optimizer_line(_run(config, lora16(), "sgd"))
    assert "Adafactor" in _optimizer_line(_run(config, lora16(), "adafactor"))
    line = _optimizer_line(_run(config, lora16(), "adamw-8bit"))
    assert "AdamW8bit" in line
    version = optimizers.bitsandbytes_version()
    if version is not None:
        assert f"bitsandbytes {version}" in line and "not installed" not in line


def _full_model_shapes(config) -> list[tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [tuple(p.shape) for p in model.parameters()]


def test_adafactor_full_fine_tuning_keeps_full_second_moments_for_1d_parameters(config):
    shapes = _full_model_shapes(config)
    est = _run(config, "full", "adafactor", batch_size=4, seq_len=256)
    assert any(len(s) == 1 for s in shapes)
    assert est.breakdown["optimizer"] == sum(adafactor(s) for s in shapes)


def test_paged_8bit_state_is_counted_on_the_gpu_and_its_paged_part_named(config):
    shapes = _full_model_shapes(config)
    numels = [_numel(s) for s in shapes]
    paged = sum(2 * n for n in numels if n >= 100_000)  # uint8 state1 + state2 of the big tensors
    assert paged == 2 * (2 * 2048 * 256 + LAYERS * 3 * 688 * 256)
    est = _run(config, "full", "paged-adamw-8bit", batch_size=4, seq_len=256)
    state = sum(eight_bit(n) for n in numels) + QMAPS
    assert est.breakdown["optimizer"] == state
    line = _optimizer_line(est)
    assert f"{paged:,} bytes of it are paged" in line and "worst case" in line
    plain = _run(config, "full", "adamw-8bit", batch_size=4, seq_len=256)
    assert plain.peak_allocated_bytes == est.peak_allocated_bytes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------------------- bitsandbytes, two ways


@pytest.mark.parametrize("name", ["adamw-8bit", "paged-adamw-8bit"])
def test_8bit_modelled_without_bitsandbytes(config, name, without_bitsandbytes):
    est = _run(config, lora16(), name)
    assert est.breakdown["optimizer"] == 415_488
    assert "modelled from bitsandbytes 0.50.2 source" in _optimizer_line(est)
    assert "(not installed)" in _optimizer_line(est)


@pytest.mark.parametrize("name", ["adamw-8bit", "paged-adamw-8bit"])
@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_8bit_bitsandbytes_and_its_model_give_the_same_bytes(config, name, adapter, monkeypatch):
    if optimizers.bitsandbytes_version() is None:
        pytest.skip("bitsandbytes does not import here")
    peft = lora16() if adapter == "lora" else "full"
    real = _run(config, peft, name)
    for module in [n for n in sys.modules if n == "bitsandbytes" or n.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    modelled = _run(config, peft, name)
    assert "not installed" in _optimizer_line(modelled)
    assert (modelled.peak_allocated_bytes, modelled.peak_reserved_bytes, modelled.breakdown) == (
        real.peak_allocated_bytes, real.peak_reserved_bytes, real.breakdown)


def test_bitsandbytes_classes_run_their_own_init_state():
    if optimizers.bitsandbytes_version() is None:
        pytest.skip("bitsandbytes does not import here")
    import bitsandbytes.optim
    import torch

    p = torch.nn.Parameter(torch.empty(64, 128, device="meta"))  # 8192 elements: 8-bit state
    p.grad = torch.empty_like(p)
    opt = optimizers.make_optimizer("paged-adamw-8bit", None, [p])
    assert isinstance(opt, bitsandbytes.optim.PagedAdamW8bit)
    opt.step()
    opt.step()
    state = opt.state[p]
    assert state["step"] == 2
    assert (state["state1"].dtype, state["state1"].shape) == (torch.uint8, p.shape)
    assert state["absmax1"].shape == (8192 // 256,) and state["qmap1"].shape == (256,)


# ------------------------------------------------------------------------------------- lengthening


@pytest.mark.parametrize("name", ["adamw-8bit", "adafactor", "sgd"])
def test_repeating_traced_layers_matches_tracing_every_layer(config, name):
    short, exact = _run(config, lora16(), name), _run(config, lora16(), name, exact=True)
    assert (short.peak_allocated_bytes, short.peak_reserved_bytes) == (exact.peak_allocated_bytes,
                                                                        exact.peak_reserved_bytes)
    assert short.breakdown == exact.breakdown
    assert _optimizer_line(short) == _optimizer_line(exact)


# ------------------------------------------------------------------------------------------- errors


def test_unknown_optimizer_names_the_choices(config):
    with pytest.raises(PeftpickError, match="unknown optimizer 'rmsprop'.*adamw-8bit"):
        _run(config, lora16(), "rmsprop")


def test_lora_fa_with_another_method_is_refused(config):
    with pytest.raises(PeftpickError, match="LoRA-FA"):
        _run(config, "full", "lora-fa")


# ------------------------------------------------------------------------------------------ command


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_estimate_command_prints_the_8bit_optimizer():
    result = CliRunner().invoke(app, ["estimate", "--model", "smollm2-135m", "--method", "lora", "--optimizer",
                                      "adamw-8bit", "--batch-size", "1", "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    assert "optimizer adamw-8bit" in result.stdout and "AdamW8bit" in result.stdout


@pytest.mark.parametrize("args, words", [
    (["--method", "lora", "--optimizer", "rmsprop"], ("rmsprop", "--optimizer", "adamw-8bit")),
    (["--method", "ia3", "--optimizer", "lora-fa"], ("LoRA-FA", "--method lora")),
    (["--method", "full", "--optimizer", "lora-fa"], ("LoRA-FA", "--method lora")),
])
def test_estimate_command_optimizer_errors_are_one_line(args, words):
    result = CliRunner().invoke(app, ["estimate", "--model", "smollm2-135m", *args])
    assert result.exit_code == 2
    line = _error_line(result)
    for word in words:
        assert word in line, line
