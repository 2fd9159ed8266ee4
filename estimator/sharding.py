"""Per-GPU memory of a training run spread over several GPUs, from the single-GPU trace.

The trace (estimator/__init__) gives the peak of one process holding everything, its parts (weights, adapter,
gradients, optimizer state, activations, logits, overhead) and the shape of every parameter by decoder layer
(`ParameterLayout`). A strategy changes what one GPU holds of the first four and adds what it gathers or buffers;
the activations and logits of the per-GPU micro-batch stay as traced.

What each strategy holds, and where that comes from:
- FSDP2 (torch 2.13.0 `torch/distributed/fsdp/_fully_shard/`): `fully_shard` on each decoder layer and on the
  root; every parameter is split along dim 0 into world-size chunks, chunk 0 padded (`_fsdp_param.py`:
  `_chunk_with_empty`, `padded_sharded_param_size`), so each rank stores ceil(rows / N) rows of it; gradients and
  the optimizer state are shaped like the local shard. Unsharded at once (modelled): the root's parameters (kept
  through forward and backward, `reshard_after_forward` docstring in `_fully_shard.py`), the layer computing and
  the one prefetched, and in backward one layer's unsharded gradients and its reduce-scatter input.
  `CPUOffloadPolicy`: the shards, their gradients and the optimizer state live in pinned host memory.
  The shard arithmetic is checked against a real gloo run on the CPU (tests/test_sharding.py).
- DDP (torch 2.13.0 `torch/nn/parallel/distributed.py`): everything replicated; with the default
  `gradient_as_bucket_view=False` the all-reduce buckets hold a second copy of every gradient.
- ZeRO (DeepSpeed 0.19.6, deepspeedai/DeepSpeed@edaa722 `deepspeed/runtime/zero/stage_1_and_2.py` and
  `stage3.py`, `estimate_zero2/3_model_states_mem_needs`): a trainable parameter costs 2 bytes of 16-bit weight
  (replicated in stage 2, partitioned in stage 3) and 18 / N bytes of partitioned state (16- and 32-bit
  gradients, the fp32 master copy, Adam's two moments); stage 3 gathers the largest layer (4 bytes a parameter)
  and keeps parameters below `stage3_param_persistence_threshold` whole on every rank; the buckets are the sizes
  transformers 5.24.0 fills in for "auto" (`integrations/deepspeed.py`: hidden_size^2 elements to reduce,
  0.9 hidden_size^2 to prefetch, persistence below 10 hidden_size), written into the emitted config. Modelled:
  DeepSpeed does not run on this project's machines.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.types import GIB, Architecture, MemoryEstimate, Strategy

# Cheapest first: no sharding, then sharding that adds no communication over DDP's (ZeRO-2), then parameter
# sharding (an all-gather per layer in forward and backward), then offload (PCIe traffic and a CPU optimizer).
# Between equals, torch's FSDP2 comes before DeepSpeed (no second framework to install).
COST_ORDER = (Strategy.DDP, Strategy.ZERO2, Strategy.FSDP2, Strategy.ZERO3, Strategy.ZERO2_OFFLOAD,
              Strategy.FSDP2_OFFLOAD, Strategy.ZERO3_OFFLOAD)
DEEPSPEED = frozenset({Strategy.ZERO2, Strategy.ZERO2_OFFLOAD, Strategy.ZERO3, Strategy.ZERO3_OFFLOAD})
SHARDED_LAYERS_GATHERED = 2  # the layer computing and the one prefetched (FSDP2's default prefetch of one)
# Per trainable parameter, partitioned (DeepSpeed's estimate_zero*_model_states_mem_needs): stage 2's 18 are 16- and
# 32-bit gradients, the fp32 master weight and Adam's two moments, beside 2 bytes of replicated 16-bit weight;
# stage 3's 18 include the 16-bit weight's partition (2), its gradient (2) and the fp32 master and moments (12).
ZERO_STATE_BYTES = 18
ZERO_LIVE_BYTES = 4  # per parameter of the largest layer, gathered (ibid.)
ZERO_OFFLOAD_HOST_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for host memory

SOURCES = {
    Strategy.DDP: "torch 2.13.0 torch/nn/parallel/distributed.py (gradient_as_bucket_view=False: buckets copy "
                  "every gradient)",
    Strategy.FSDP2: "torch 2.13.0 torch/distributed/fsdp/_fully_shard (dim-0 chunks, chunk 0 padded; the root "
                    "kept unsharded through backward); shard bytes checked against a gloo run",
    Strategy.ZERO2: "DeepSpeed 0.19.6 (deepspeedai/DeepSpeed@edaa722) stage_1_and_2.py "
                    "estimate_zero2_model_states_mem_needs; buckets as transformers 5.24.0 fills 'auto'",
    Strategy.ZERO3: "DeepSpeed 0.19.6 (deepspeedai/DeepSpeed@edaa722) stage3.py "
                    "estimate_zero3_model_states_mem_needs; buckets as transformers 5.24.0 fills 'auto'",
}
SOURCES[Strategy.FSDP2_OFFLOAD] = SOURCES[Strategy.FSDP2] + "; CPUOffloadPolicy keeps the shards on the host"
SOURCES[Strategy.ZERO2_OFFLOAD] = SOURCES[Strategy.ZERO2] + " (cpu_offload=True)"
SOURCES[Strategy.ZERO3_OFFLOAD] = SOURCES[Strategy.ZERO3] + " (cpu_offload, cpu_offload_params)"


@dataclass(frozen=True)
class ParameterShape:
    rows: int  # size of dim 0, along which FSDP2 shards
    row_elements: int  # elements per row
    element_bytes: int
    trainable: bool

    @property
    def elements(self) -> int:
        return self.rows * self.row_elements

    @property
    def nbytes(self) -> int:
        return self.elements * self.element_bytes

    def fsdp_shard_bytes(self, ranks: int) -> int:
        """What FSDP2 stores of it on every rank: chunk 0's rows (the others are padded to it)."""
        return math.ceil(self.rows / ranks) * self.row_elements * self.element_bytes


def _parse_shapes(entries) -> tuple[ParameterShape, ...]:
    """[[rows, elements per row, bytes per element, trainable], ...] -> ParameterShapes."""
    return tuple(ParameterShape(int(r), int(e), int(b), bool(t)) for r, e, b, t in entries)


@dataclass(frozen=True)
class ParameterLayout:
    """The parameters of the model as traced, by FSDP unit: the root (embeddings, final norm, LM head) and the
    decoder layers, each group of alike layers once with how many there are."""

    root: tuple[ParameterShape, ...]
    layers: tuple[tuple[int, tuple[ParameterShape, ...]], ...]  # (count, the parameters of one such layer)

    @classmethod
    def from_traced(cls, shapes: dict, repeated: range = range(0), extra_copies: int = 0) -> ParameterLayout:
        """From estimator.training.parameter_shapes of the traced model; the layers in `repeated` stand for
        `extra_copies` more each (the layers the trace did not build)."""
        parse = _parse_shapes
        counts: dict[tuple[ParameterShape, ...], int] = {}
        for key, entries in shapes.items():
            if key in ("root", "layer_class"):
                continue
            params = parse(entries)
            counts[params] = counts.get(params, 0) + 1 + (extra_copies if int(key) in repeated else 0)
        return cls(parse(shapes.get("root", ())), tuple((count, params) for params, count in counts.items()))

    def to_json(self) -> dict[str, Any]:
        def rows(params):
            return [[p.rows, p.row_elements, p.element_bytes, int(p.trainable)] for p in params]

        return {"root": rows(self.root), "layers": [[count, rows(params)] for count, params in self.layers]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ParameterLayout:
        parse = _parse_shapes
        return cls(parse(data.get("root", ())), tuple((int(c), parse(p)) for c, p in data.get("layers", ())))

    def parameters(self):
        """Every parameter, a layer's as often as there are such layers: (shape, count)."""
        for p in self.root:
            yield p, 1
        for count, params in self.layers:
            for p in params:
                yield p, count

    def total(self, trainable: bool | None = None, per_rank: int | None = None) -> int:
        """Bytes of the parameters (`trainable` None: all), whole or as FSDP2 stores them on each of `per_rank`."""
        return sum(count * (p.nbytes if per_rank is None else p.fsdp_shard_bytes(per_rank))
                   for p, count in self.parameters() if trainable is None or p.trainable == trainable)

    def elements(self, trainable: bool | None = None) -> int:
        return sum(count * p.elements for p, count in self.parameters() if trainable is None or p.trainable == trainable)

    def largest_layer(self, trainable: bool | None = None) -> tuple[int, int]:
        """(bytes, elements) of the largest decoder layer's parameters (`trainable`: of those only)."""
        best = (0, 0)
        for _count, params in self.layers:
            chosen = [p for p in params if trainable is None or p.trainable == trainable]
            best = max(best, (sum(p.nbytes for p in chosen), sum(p.elements for p in chosen)))
        return best


def per_gpu(estimate: MemoryEstimate, arch: Architecture, gpus: int, strategy: Strategy) -> MemoryEstimate:
    """The estimate as each of `gpus` GPUs sees it under `strategy` (the busiest rank: rank 0, which holds the
    padded chunks). Strategy.SINGLE or one GPU with DDP returns the estimate unchanged."""
    strategy = Strategy(strategy)
    if strategy is Strategy.SINGLE or (gpus == 1 and strategy is Strategy.DDP):
        return estimate
    if not estimate.layout:
        raise PeftpickError(f"no parameter layout was traced for {arch.name}, so its {strategy.value} figures "
                            "cannot be worked out", "plan it on one GPU (drop --gpus)")
    layout = ParameterLayout.from_json(estimate.layout)
    full = estimate.breakdown.get("adapter", 0) == 0 and layout.total(trainable=True) > 0
    parts = dict(estimate.breakdown)
    trainable_bytes = layout.total(trainable=True)
    host = 0
    notes: list[str] = []
    rank_state: dict[str, int] = {}

    def share(part: str, fraction: float) -> None:
        parts[part] = int(round(parts.get(part, 0) * fraction))

    if strategy is Strategy.DDP:
        parts["communication buffers"] = trainable_bytes  # the buckets' copy of every gradient
        rank_state = {"parameters": layout.total(), "gradients": trainable_bytes,
                      "optimizer state": int(estimate.layout.get("optimizer_state", 0))}
        notes.append("DDP: every GPU holds the whole model; the all-reduce buckets add a copy of the "
                     f"{trainable_bytes / GIB:.2f} GiB of gradients (gradient_as_bucket_view=False, the default)")
    elif strategy in (Strategy.FSDP2, Strategy.FSDP2_OFFLOAD):
        trainable_shard = layout.total(trainable=True, per_rank=gpus)
        frozen_full, frozen_shard = layout.total(trainable=False), layout.total(trainable=False, per_rank=gpus)
        ratio = trainable_shard / trainable_bytes if trainable_bytes else 0.0
        weights_params = frozen_full + (trainable_bytes if full else 0)
        weights_shard = frozen_shard + (trainable_shard if full else 0)
        buffers = max(0, parts.get("weights", 0) - weights_params)  # rotary tables etc.: not sharded
        parts["weights"] = buffers + weights_shard
        if not full:
            parts["adapter"] = parts.get("adapter", 0) - trainable_bytes + trainable_shard
        share("grads", ratio)
        share("optimizer", ratio)
        optimizer_state = int(round(estimate.layout.get("optimizer_state", 0) * ratio))
        rank_state = {"parameters": weights_shard + (0 if full else trainable_shard), "gradients": trainable_shard,
                      "optimizer state": optimizer_state}
        if strategy is Strategy.FSDP2_OFFLOAD:
            host = parts["weights"] - buffers + parts.get("adapter", 0) + parts.get("optimizer", 0) + trainable_shard
            parts["weights"] = buffers
            for part in ("adapter", "grads", "optimizer"):
                parts[part] = 0
        layer_bytes = layout.largest_layer()[0]
        root_bytes = layout.total() - sum(count * sum(p.nbytes for p in params) for count, params in layout.layers)
        parts["gathered parameters"] = root_bytes + SHARDED_LAYERS_GATHERED * layer_bytes
        parts["communication buffers"] = 2 * layout.largest_layer(trainable=True)[0]
        notes.append(f"FSDP2 over {gpus} GPUs: each holds ceil(rows / {gpus}) rows of every parameter, "
                     f"{weights_shard / GIB:.2f} GiB of weights" + (
                         "" if full else f" and {trainable_shard / GIB:.3f} GiB of adapter")
                     + f"; gathered at once: the root ({root_bytes / GIB:.2f} GiB, kept through backward) and "
                     f"{SHARDED_LAYERS_GATHERED} decoder layers ({layer_bytes / GIB:.2f} GiB each)")
        if host:
            notes.append(f"CPU offload: {host / GIB:.1f} GiB of shards, gradients and optimizer state in pinned host "
                         "memory per GPU; the optimizer steps on the CPU")
    else:
        host, zero_notes = _zero(parts, layout, arch, gpus, strategy, full)
        notes += zero_notes
        # ZeRO's partitioned gradients are inside its 18 bytes; with offload the state is on the host (host_bytes)
        rank_state = {} if host else {"parameters": parts["weights"] + parts["adapter"], "gradients": 0,
                                      "optimizer state": parts["optimizer"]}
    allocated = sum(parts.values())
    delta = allocated - estimate.peak_allocated_bytes
    notes.append(f"per-GPU figures of {strategy.value} on {gpus} GPUs, {'modelled from' if strategy in DEEPSPEED else 'from the trace and'} "
                 f"{SOURCES[strategy]}; activations and logits of the per-GPU micro-batch as traced, gathered "
                 "parameters added at the traced peak (an upper bound when the peak is the optimizer step)")
    return dataclasses.replace(
        estimate,
        peak_allocated_bytes=allocated,
        peak_reserved_bytes=max(allocated, estimate.peak_reserved_bytes + delta),
        breakdown=parts,
        gpus=gpus,
        strategy=strategy.value,
        host_bytes=host,
        rank_state=rank_state,
        assumptions=estimate.assumptions + tuple(notes),
        source=f"{estimate.source}, per GPU ({strategy.value} over {gpus})",
    )


def zero_buckets(arch: Architecture) -> dict[str, int]:
    """The bucket sizes (elements) transformers fills in for DeepSpeed's "auto" values, from the hidden size."""
    hidden = arch.hidden_size
    return {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}


def _zero(parts: dict[str, int], layout: ParameterLayout, arch: Architecture, gpus: int, strategy: Strategy,
          full: bool) -> tuple[int, list[str]]:
    """ZeRO's per-GPU parts, in place; returns (host bytes per node, notes)."""
    stage3 = strategy in (Strategy.ZERO3, Strategy.ZERO3_OFFLOAD)
    offload = strategy in (Strategy.ZERO2_OFFLOAD, Strategy.ZERO3_OFFLOAD)
    buckets = zero_buckets(arch)
    trainable = layout.elements(trainable=True)
    frozen_bytes = layout.total(trainable=False)
    persistent = sum(count * p.nbytes for p, count in layout.parameters()
                     if p.elements < buckets["stage3_param_persistence_threshold"]) if stage3 else 0
    weights_params = frozen_bytes + (layout.total(trainable=True) if full else 0)
    buffers = max(0, parts.get("weights", 0) - weights_params)
    frozen_on_gpu = frozen_bytes if not stage3 else (0 if offload else math.ceil(frozen_bytes / gpus))
    sixteen_bit = 2 * trainable if not stage3 else (0 if offload else math.ceil(2 * trainable / gpus))
    parts["weights"] = buffers + frozen_on_gpu + (sixteen_bit if full else 0) + persistent
    parts["adapter"] = 0 if full else sixteen_bit
    parts["grads"] = 0
    state = ZERO_STATE_BYTES - (2 if stage3 else 0)  # stage 3's 16-bit partition is in weights / adapter above
    parts["optimizer"] = 0 if offload else math.ceil(state * trainable / gpus)
    bucket_bytes = 2 * buckets["reduce_bucket_size"] + (2 * buckets["stage3_prefetch_bucket_size"] if stage3 else 0)
    parts["communication buffers"] = bucket_bytes
    host = 0
    notes = []
    if stage3:
        largest = layout.largest_layer()[1]
        parts["gathered parameters"] = ZERO_LIVE_BYTES * largest
        notes.append(f"ZeRO-3 over {gpus} GPUs: parameters partitioned ({(frozen_on_gpu + sixteen_bit) / GIB:.2f} GiB "
                     f"per GPU), the largest layer gathered ({ZERO_LIVE_BYTES} bytes x {largest:,} parameters), "
                     f"{persistent / GIB:.3f} GiB of small parameters kept whole")
    else:
        notes.append(f"ZeRO-2 over {gpus} GPUs: the 16-bit weights replicated, gradients, fp32 master weights and "
                     "Adam state partitioned (18 bytes a trainable parameter / GPUs)")
    if offload:
        host_elements = layout.elements() if stage3 else trainable
        per_element = ZERO_STATE_BYTES if stage3 else max(4 * gpus, 16)
        host = int(host_elements * per_element * ZERO_OFFLOAD_HOST_FACTOR)
        notes.append(f"CPU offload: {host / GIB:.1f} GiB of host memory on the node (DeepSpeed's own estimate); the "
                     "optimizer steps on the CPU")
    notes.append("DeepSpeed casts the trainable parameters to bf16 and keeps fp32 master copies (bf16.enabled)")
    return host, notes


def available_strategies(gpus: int, quant: str, deepspeed_installed: bool) -> tuple[Strategy, ...]:
    """The strategies `auto` chooses from, cheapest first."""
    if gpus == 1:
        return (Strategy.SINGLE,)
    if quant != "none":  # a quantized base is planned with data parallelism only (its shards are not modelled)
        return (Strategy.DDP,)
    return tuple(s for s in COST_ORDER if deepspeed_installed or s not in DEEPSPEED)
