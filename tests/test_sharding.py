"""Per-GPU figures of multi-GPU strategies (estimator.sharding), checked against a real FSDP2 run: two
processes under torchrun on the CPU with gloo (tests/fsdp_gloo_worker.py)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from peftpick.estimator import estimate
from peftpick.estimator.sharding import ParameterLayout, per_gpu, zero_buckets
from peftpick.knowledge.architectures import resolve_model
from peftpick.types import Strategy

WORKER = Path(__file__).with_name("fsdp_gloo_worker.py")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    # 6 layers: more than the estimator traces, so the layout's repeated layers are exercised; odd sizes
    # (vocabulary 301, 2 KV heads of 16) leave dim-0 chunks uneven, so padding shows
    folder = tmp_path_factory.mktemp("fsdp") / "model"
    LlamaConfig(hidden_size=64, intermediate_size=120, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=301, max_position_embeddings=128,
                tie_word_embeddings=False).save_pretrained(folder)
    return folder


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _gloo_run(model: Path, adapter: str, out: Path, ranks: int = 2) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={ranks}", str(WORKER), str(model), adapter, str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(ranks)]


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_fsdp2_shard_bytes_equal_what_each_rank_holds(tiny_model, tmp_path, adapter):
    ranks = _gloo_run(tiny_model, adapter, tmp_path)
    config = _lora() if adapter == "lora" else "full"
    single = estimate(str(tiny_model), config, batch_size=2, seq_len=16, dtype="bfloat16")
    layout = ParameterLayout.from_json(single.layout)
    sharded = per_gpu(single, resolve_model(str(tiny_model)), 2, Strategy.FSDP2)
    frozen, trainable = layout.total(trainable=False, per_rank=2), layout.total(trainable=True, per_rank=2)
    # every rank stores chunk 0's size (padded); rank 0's chunk is that size, the last rank's is smaller
    for rank in ranks:
        assert rank["frozen_stored"] == frozen and rank["trainable_stored"] == trainable
    # gradients are shaped like the local shard (rank 0 exactly; a shorter last chunk may share a larger block)
    assert ranks[0]["grads"] == trainable and ranks[1]["grads"] <= trainable
    uneven = "frozen" if adapter == "lora" else "trainable"
    assert ranks[0][uneven] == (frozen if adapter == "lora" else trainable) > ranks[1][uneven]
    # the estimate's per-GPU parts are those bytes: weights (plus unsharded buffers), adapter, optimizer moments
    buffers = single.breakdown["weights"] - (layout.total(trainable=False) + (0 if adapter == "lora" else layout.total(trainable=True)))
    assert 0 <= buffers < 1024
    if adapter == "lora":
        assert sharded.breakdown["weights"] - buffers == frozen
        assert sharded.breakdown["adapter"] == trainable
    else:
        assert sharded.breakdown["weights"] - buffers == frozen + trainable
    # what the estimate says each GPU holds once every gradient exists
    held = ranks[0]
    assert sharded.rank_state["parameters"] == frozen + trainable == held["frozen_stored"] + held["trainable_stored"]
    assert sharded.rank_state["gradients"] == held["grads"]
    # AdamW's moments are shaped like the shards; its step counters are scalars, one per parameter
    assert held["optimizer_moments"] <= sharded.rank_state["optimizer state"] <= held["optimizer_moments"] + held["optimizer_other"] * 2
    # the whole model is the layout's, to the parameter (6 layers, 2 of them not traced but repeated)
    assert layout.elements() == single.total_params
    assert sum(count for count, _ in layout.layers) == 6


def test_layout_of_a_bundled_model_repeats_the_traced_layers():
    single = estimate("llama-3.1-70b", "lora", batch_size=1, seq_len=256)
    layout = ParameterLayout.from_json(single.layout)
    assert sum(count for count, _ in layout.layers) == 80
    assert layout.elements() == single.total_params
    four = per_gpu(single, resolve_model("llama-3.1-70b"), 4, Strategy.FSDP2)
    # the frozen bf16 weights split four ways; the root (embeddings, LM head: 2 x 128256 x 8192 x 2 bytes) and
    # two decoder layers gathered
    assert four.breakdown["weights"] == pytest.approx(single.breakdown["weights"] / 4, rel=1e-3)
    root = 2 * 128256 * 8192 * 2 + 8192 * 2
    layer = layout.largest_layer()[0]
    assert four.breakdown["gathered parameters"] == root + 2 * layer
    assert four.peak_allocated_bytes < single.peak_allocated_bytes / 2
    assert four.gpus == 4 and four.strategy == "fsdp2"


def test_zero_model_states_follow_deepspeeds_formula_for_full_fine_tuning(tiny_model):
    single = estimate(str(tiny_model), "full", batch_size=2, seq_len=16, dtype="bfloat16")
    arch = resolve_model(str(tiny_model))
    layout = ParameterLayout.from_json(single.layout)
    total, largest = layout.elements(), layout.largest_layer()[1]
    states = ("weights", "adapter", "grads", "optimizer", "gathered parameters")
    buffers = single.breakdown["weights"] - layout.total()
    persistent_limit = zero_buckets(arch)["stage3_param_persistence_threshold"]
    persistent = sum(count * p.nbytes for p, count in layout.parameters() if p.elements < persistent_limit)
    for gpus in (2, 4):
        zero2 = per_gpu(single, arch, gpus, Strategy.ZERO2).breakdown
        # DeepSpeed 0.19.6 estimate_zero2_model_states_mem_needs, no offload: 2 P + 18 P / N
        assert sum(zero2.get(part, 0) for part in states) - buffers == 2 * total + math.ceil(18 * total / gpus)
        zero3 = per_gpu(single, arch, gpus, Strategy.ZERO3).breakdown
        # estimate_zero3_model_states_mem_needs, no offload: 4 x largest layer + 18 P / N (+ persistent params)
        expected = 4 * largest + math.ceil(2 * total / gpus) + math.ceil(16 * total / gpus)
        assert sum(zero3.get(part, 0) for part in states) - buffers - persistent == pytest.approx(expected, abs=2)
        offload = per_gpu(single, arch, gpus, Strategy.ZERO3_OFFLOAD)
        assert offload.host_bytes == int(total * 18 * 1.5)
        assert offload.breakdown["optimizer"] == 0


def test_ddp_adds_a_copy_of_the_gradients_and_one_gpu_changes_nothing(tiny_model):
    single = estimate(str(tiny_model), "full", batch_size=2, seq_len=16, dtype="bfloat16")
    arch = resolve_model(str(tiny_model))
    ddp = per_gpu(single, arch, 2, Strategy.DDP)
    assert ddp.peak_allocated_bytes - single.peak_allocated_bytes == ParameterLayout.from_json(single.layout).total(trainable=True)
    assert per_gpu(single, arch, 1, Strategy.DDP) is single
