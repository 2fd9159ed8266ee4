"""The memory estimator's mechanism, checked on small architectures on the CPU (no GPU involved).

Accuracy against real GPU peaks is measured by benchmarks/compare_estimates.py, not here.
"""

from __future__ import annotations

import contextlib
import json

import pytest
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from peftpick.errors import PeftpickError
from peftpick.estimator import estimate, estimate_architecture, layer_period
from peftpick.estimator.allocator import CachingAllocatorModel, round_size, segment_size
from peftpick.estimator.replay import BREAKDOWN_PARTS
from peftpick.knowledge.architectures import architecture_from_config
from peftpick.types import TrainingShape

MiB = 1 << 20


def small_llama(layers: int = 10) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def config() -> LlamaConfig:
    return small_llama()


def lora(r: int = 8, **kwargs) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kwargs)


def peak(config, adapter, **kwargs):
    return estimate(config, adapter, **{"batch_size": 2, "seq_len": 128, **kwargs})


# ----------------------------------------------------------------------------------------- allocator


def test_allocator_rounds_and_sizes_segments_like_the_cuda_caching_allocator():
    assert round_size(1) == 512 and round_size(513) == 1024
    assert segment_size(1 * MiB) == 2 * MiB  # small pool
    assert segment_size(1 * MiB + 512) == 20 * MiB  # 1-10 MiB requests share 20 MiB segments
    assert segment_size(10 * MiB + 1) == 12 * MiB  # large requests rounded up to 2 MiB


def test_allocator_reuses_freed_blocks_and_reserves_new_segments_only_when_needed():
    alloc = CachingAllocatorModel()
    alloc.malloc(1, 100 * MiB)
    alloc.free(1)
    alloc.malloc(2, 60 * MiB)  # fits in the cached 100 MiB block, split off its front
    alloc.malloc(3, 40 * MiB)  # takes the 40 MiB remainder
    assert alloc.stats.reserved == 100 * MiB and alloc.stats.segments == 1
    alloc.malloc(4, 1 * MiB + 512)
    assert alloc.stats.reserved == 120 * MiB  # a 20 MiB segment for a 1-10 MiB request
    alloc.free(2)
    alloc.free(3)
    alloc.malloc(5, 100 * MiB)  # the two halves merged back into one free block
    assert alloc.stats.segments == 2
    assert alloc.stats.peak_allocated == 100 * MiB + round_size(1 * MiB + 512)


def test_allocator_hands_out_whole_block_when_remainder_is_small():
    alloc = CachingAllocatorModel()
    alloc.malloc(1, 12 * MiB)
    alloc.free(1)
    size = alloc.malloc(2, 11 * MiB + 512)  # remainder < 1 MiB is not split off in the large pool
    assert size == 12 * MiB and alloc.stats.allocated == 12 * MiB


# ----------------------------------------------------------------------------------------- estimates


def test_breakdown_adds_up_and_reserved_covers_allocated(config):
    est = peak(config, lora())
    assert set(est.breakdown) == set(BREAKDOWN_PARTS)
    assert sum(est.breakdown.values()) == est.peak_allocated_bytes
    assert est.peak_reserved_bytes >= est.peak_allocated_bytes
    # bf16 weights of the base model are all live at the peak
    weights = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) * 2
    assert est.breakdown["weights"] >= weights


def test_trainable_parameters_match_get_peft_model_exactly(config):
    est = peak(config, lora(r=16))
    model = get_peft_model(AutoModelForCausalLM.from_config(config), lora(r=16))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert (est.trainable_params, est.total_params) == (trainable, total)


def test_lora_fa_needs_less_than_lora(config):
    assert peak(config, lora(), optimizer="lora-fa").peak_allocated_bytes < peak(config, lora()).peak_allocated_bytes


def test_dora_needs_more_than_lora(config):
    dora = peak(config, lora(use_dora=True))
    plain = peak(config, lora())
    assert dora.peak_allocated_bytes > plain.peak_allocated_bytes
    assert dora.breakdown["activations"] > plain.breakdown["activations"]


def test_gradient_checkpointing_lowers_activations(config):
    without = peak(config, lora(), batch_size=4, seq_len=256)
    with_ckpt = peak(config, lora(), batch_size=4, seq_len=256, gradient_checkpointing=True)
    assert with_ckpt.breakdown["activations"] < without.breakdown["activations"] / 2
    assert with_ckpt.peak_allocated_bytes < without.peak_allocated_bytes


def test_prompt_tuning_grows_with_virtual_tokens(config):
    def prompt(tokens):
        return PromptTuningConfig(num_virtual_tokens=tokens, task_type="CAUSAL_LM")

    small, large = peak(config, prompt(16)), peak(config, prompt(128))
    assert large.peak_allocated_bytes > small.peak_allocated_bytes
    assert large.trainable_params == 128 * config.hidden_size


@pytest.mark.parametrize("knob", ["batch_size", "seq_len"])
def test_estimate_grows_with_batch_and_sequence_length(config, knob):
    figures = [peak(config, lora(), **{knob: value}).peak_allocated_bytes for value in (2, 4, 8)]
    assert figures[0] < figures[1] < figures[2]


def test_full_finetuning_holds_gradients_and_adam_states(config):
    est = peak(config, "full", batch_size=1, seq_len=8)  # tiny batch: the optimizer step is the peak
    params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert est.trainable_params == params
    assert est.breakdown["grads"] == pytest.approx(2 * params, rel=0.05)  # bf16 gradients
    assert est.breakdown["optimizer"] >= 4 * params  # two bf16 Adam states
    assert est.adapter_file_bytes == 2 * params  # save_pretrained writes the bf16 model


@pytest.mark.parametrize(
    "adapter, ckpt",
    [(lora(), False), ("full", False), (lora(use_dora=True), True), (PromptTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM"), False)],
)
def test_repeating_a_few_traced_layers_gives_the_same_peaks_as_tracing_every_layer(config, adapter, ckpt):
    arch = architecture_from_config(config, name="small-llama", source="test")
    shape = TrainingShape(batch_size=2, seq_len=128, gradient_checkpointing=ckpt)
    from peftpick.estimator import resolve_adapter

    peft_config = resolve_adapter(adapter, arch)
    fast = estimate_architecture(arch, peft_config, shape)
    exact = estimate_architecture(arch, peft_config, shape, exact=True)
    assert any("repeated" in a for a in fast.assumptions) and any("every layer" in a for a in exact.assumptions)
    assert fast.peak_allocated_bytes == pytest.approx(exact.peak_allocated_bytes, rel=1e-3)
    # Allocations PEFT makes while wrapping (DoRA's weight norms) are not repeated: a segment or so of reserve.
    assert fast.peak_reserved_bytes == pytest.approx(exact.peak_reserved_bytes, rel=0.02)
    assert (fast.trainable_params, fast.total_params) == (exact.trainable_params, exact.total_params)


def test_layer_period_follows_the_local_global_pattern():
    from transformers import Gemma2Config

    gemma = Gemma2Config(num_hidden_layers=6, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, vocab_size=256)
    assert layer_period(architecture_from_config(gemma, name="g", source="test")) == 2
    assert layer_period(architecture_from_config(small_llama(), name="l", source="test")) == 1


# ----------------------------------------------------------------------------------------- bad input


def test_targets_missing_from_the_model_give_a_clear_error(config):
    with pytest.raises(PeftpickError) as error:
        peak(config, LoraConfig(target_modules=["query_key_value"], task_type="CAUSAL_LM"))
    assert "query_key_value" in str(error.value) and "q_proj" in error.value.fix


def test_unreadable_adapter_config_names_the_file(tmp_path, config):
    bad = tmp_path / "adapter_config.json"
    bad.write_text("{not json")
    with pytest.raises(PeftpickError, match="adapter_config.json"):
        peak(config, str(bad))
    bad.write_text(json.dumps({"r": 8}))
    with pytest.raises(PeftpickError, match="peft_type"):
        peak(config, str(bad))


def test_adapter_config_file_is_read(tmp_path, config):
    lora(r=4).save_pretrained(tmp_path)
    assert peak(config, str(tmp_path / "adapter_config.json")).trainable_params == peak(config, lora(r=4)).trainable_params


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch size"), ({"seq_len": 1}, "sequence length"),
    ({"optimizer": "rmsprop"}, "optimizer"), ({"dtype": "int8"}, "dtype"),
])
def test_bad_shapes_are_rejected(config, kwargs, match):
    with pytest.raises(PeftpickError, match=match):
        peak(config, lora(), **kwargs)


def test_lora_fa_needs_a_lora_adapter(config):
    with pytest.raises(PeftpickError, match="LoRA-FA"):
        peak(config, "full", optimizer="lora-fa")


def test_estimating_a_large_run_allocates_no_real_memory(config):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    est = peak(config, lora(), batch_size=64, seq_len=2048)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert est.peak_allocated_bytes > 8 << 30  # the run needs GiBs on a GPU...
    assert grown < 512 * 1024  # ...and tracing it on the meta device takes no such memory here


def test_unknown_method_names_close_matches():
    with pytest.raises(PeftpickError, match="lora") as error:
        estimate("smollm2-135m", "lorra", batch_size=1, seq_len=8)
    assert "\n" not in str(error.value)


def test_method_name_with_rank_and_targets_overrides(config):
    est = estimate("smollm2-135m", "lora", rank=4, targets=["q_proj", "k_proj", "v_proj"], batch_size=1, seq_len=8)
    # SmolLM2-135M: 30 layers, hidden 576, 3 KV heads x 64: q 576->576, k and v 576->192
    assert est.trainable_params == 30 * 4 * ((576 + 576) + 2 * (576 + 192))


def test_boft_permutation_matrix_equals_peft_perm2mat_and_boft_builds_on_meta():
    import torch
    from peft.tuners.boft.layer import BOFTLayer

    from peftpick.estimator.training import _builds_on_meta, permutation_matrix

    layer = BOFTLayer.__new__(BOFTLayer)  # perm2mat and block_butterfly_perm read no layer state
    for n, blocks, half_block, factor in ((16, 4, 2, 1), (64, 8, 4, 2), (12, 3, 2, 0)):
        indices = layer.block_butterfly_perm(n, blocks, half_block, factor)
        expected = layer.perm2mat(indices)
        got = permutation_matrix(indices)
        assert got.dtype == expected.dtype == torch.float32 and torch.equal(got, expected)
    from peft import BOFTConfig

    assert _builds_on_meta(BOFTConfig(boft_block_size=4, target_modules=["q_proj"]))


def test_boft_estimate_is_unchanged_by_the_vectorized_permutations(config):
    """The meta build with the one-write permutation matrix gives the bytes PEFT's own per-element build gives."""
    from unittest import mock

    from peft import BOFTConfig

    import peftpick.estimator.training as training

    arch = architecture_from_config(config, name="small-llama", source="test")
    shape = TrainingShape(batch_size=2, seq_len=32, gradient_checkpointing=True)
    boft = BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"])
    fast = estimate_architecture(arch, boft, shape, exact=True)
    with mock.patch.object(training, "_builds_on_meta", lambda _config: False), \
            mock.patch.object(training, "_vectorized_boft_permutations", contextlib.nullcontext):
        slow = estimate_architecture(arch, boft, shape, exact=True)
    assert (fast.peak_allocated_bytes, fast.peak_reserved_bytes, fast.trainable_params) == \
        (slow.peak_allocated_bytes, slow.peak_reserved_bytes, slow.trainable_params)
    assert fast.breakdown == slow.breakdown


def _traced(program):
    """Events (kind, bytes) and the result of `program()` run on meta inside a StorageTracker."""
    from peftpick.estimator.tracer import StorageTracker

    tracker = StorageTracker()
    with tracker:
        result = program()
    return [(kind, nbytes) for kind, _handle, nbytes, _unit in tracker.trace.events], result


def test_skipping_in_place_list_updates_on_meta_changes_no_traced_event(monkeypatch):
    # AdamW's foreach updates return nothing and make no storage; on meta their kernels only check shapes in
    # Python, so the tracer skips them: the step's events must be the same as with the kernels run
    import torch

    from peftpick.estimator import tracer

    def adamw_steps():
        params = [torch.nn.Parameter(torch.empty(64, 32, device="meta")) for _ in range(6)]
        optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        for _ in range(2):
            for p in params:
                p.grad = torch.empty_like(p)
            optimizer.step()
        return optimizer

    skipped, _ = _traced(adamw_steps)
    assert any(kind == "inplace list" for kind in tracer._KIND.values())
    monkeypatch.setattr(tracer, "_KIND", {})
    real_kind = tracer._kind
    monkeypatch.setattr(tracer, "_kind", lambda func: "other" if real_kind(func) == "inplace list" else real_kind(func))
    run, _ = _traced(adamw_steps)
    assert skipped == run and len(run) > 12


def test_block_diag_of_unbound_blocks_allocates_what_cuda_does():
    # torch.block_diag(*torch.unbind(x)) (BOFT without its CUDA extension): the dense output in forward and, in
    # backward, block_diag's slices of the output gradient (views) stacked by unbind's backward into one buffer
    import torch

    from peftpick.estimator.kernels import KernelStandIns
    from peftpick.estimator.tracer import ALLOC

    blocks, size = 64, 4
    base = torch.nn.Parameter(torch.empty(1, blocks, size, size, device="meta"))

    def forward_backward():
        with KernelStandIns():
            rotated = base * 2
            dense = torch.block_diag(*torch.unbind(rotated.squeeze(0)))
            dense.sum().backward()
        return dense

    events, dense = _traced(forward_backward)
    assert dense.shape == (blocks * size, blocks * size) and base.grad.shape == base.shape
    allocated = [nbytes for kind, nbytes in events if kind == ALLOC]
    stacked = blocks * size * size * 4
    assert (blocks * size) ** 2 * 4 in allocated  # the dense output
    assert allocated.count(stacked) == 3  # x * 2, the stacked gradient, and the parameter's gradient
    assert size * size * 4 not in allocated  # nothing per block
