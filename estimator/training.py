"""The training program whose memory is estimated, run for real on the meta device under the tracer.

It is the plain loop a practitioner writes (and the one the GPU measurements in benchmarks/ use):

    out = model(input_ids=x, labels=x)      # the previous step's `out` lives until this line rebinds it
    out.loss.backward()
    clip_grad_norm_(trainable, 1.0); optimizer.step(); optimizer.zero_grad(set_to_none=True)

Keeping `out` matters: it holds the bf16 logits (and the KV cache when `use_cache` is on) through backward and
into the next forward, which is what the GPU shows (see benchmarks/compare_estimates.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from peftpick.estimator.kernels import KernelStandIns
from peftpick.estimator.optimizers import make_optimizer, paged_state_bytes, state_tensors
from peftpick.estimator.quantized import quantization_state
from peftpick.estimator.tracer import ALLOC, MetaValues, StorageTracker, Trace
from peftpick.knowledge.architectures import skip_weight_init

# cuBLAS keeps one workspace per (handle, stream); the forward thread and the autograd thread each own a
# handle. torch sizes it from CUBLAS_WORKSPACE_CONFIG, ":4096:8" (32 MiB) on Hopper by default; the H100
# measurements show exactly 2 x 32 MiB held before the model is built in every run after the first.
CUBLAS_WORKSPACE_BYTES = 32 << 20
CUBLAS_HANDLES = 2


@dataclass(frozen=True)
class TrainingProgram:
    """Everything the traced loop needs. `peft_config` None means full fine-tuning."""

    config: object  # transformers.PretrainedConfig
    peft_config: object | None
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    optimizer: str  # one of estimator.optimizers.OPTIMIZERS
    dtype: torch.dtype
    steps: int = 2
    learning_rate: float = 1e-4
    weight_decay: float = 0.1
    quant: str = "none"  # a Quant value: the frozen base built as bitsandbytes quantizes it (estimator.quantized)
    loss: str = "stock"  # a LossKernel value (estimator.losses)
    trainer: str = "plain"  # a Trainer value: what the loop keeps between forward and the next step


def trace_training(program: TrainingProgram, period: int = 1) -> tuple[Trace, dict[str, dict[int | None, int]]]:
    """Run `program` on the meta device.

    Returns the allocation trace, with events and storages attributed to units of `period` decoder layers, and
    the trainable and total parameter counts per unit (None: outside the decoder layers).
    """
    from transformers import AutoModelForCausalLM

    nonzero_rows = _mask_counts(program.peft_config)
    # The model is built and wrapped outside the tracer (building runs thousands of tiny ops - BOFT's
    # permutation matrices alone tens of thousands - that allocate nothing lasting); its weights are then
    # logged in the order they were created: the base model's, then the adapter's.
    with torch.device("meta"), skip_weight_init():
        model = AutoModelForCausalLM.from_config(program.config, dtype=program.dtype)
    model.tie_weights()
    upcast: set[int] = set()
    if program.quant != "none":
        from peftpick.estimator.quantized import quantize_on_meta

        half = {id(p) for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)}
        # TRL's SFTTrainer does not call prepare_model_for_kbit_training (it casts the adapter to bf16 instead)
        model = quantize_on_meta(model, program.quant, program.dtype, prepare=program.trainer != "trl")
        upcast = {id(p) for p in model.parameters() if p.dtype == torch.float32 and id(p) in half}
    base_tensors = _tensors_in_creation_order(model)
    if program.gradient_checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={
                "use_reentrant": False,
                # the recomputation in backward must see the same attention kernel as the forward
                "context_fn": lambda: (contextlib.nullcontext(), KernelStandIns()),
            }
        )
        model.enable_input_require_grads()
    if program.peft_config is not None:
        from peft import get_peft_model

        # PEFT builds adapter weights on the CPU and moves them to the base weights' device (meta): for the few
        # layers traced that is fast, where building them on meta runs every tiny op through Python (BOFT's
        # permutation matrices are made element by element). SHiRA's random masks over whole weights are the
        # exception: cheap on meta, given the count of ones they hold. So is MiCA's LoRA, whose lora_B (the base
        # weight's minor singular vectors) PEFT leaves unset on meta. Set-up steps that need the base weights'
        # values are replaced by ones that need only their shapes (`_value_free_setup`, `_skip_deferred_setup`).
        on_meta = _builds_on_meta(program.peft_config)
        building = _on_meta(MetaValues(nonzero_rows)) if on_meta else contextlib.ExitStack()
        with building, _one_thread(), _value_free_setup(program.peft_config):
            model = get_peft_model(model, program.peft_config)
        _skip_deferred_setup(model)
        if any(t.device.type != "meta" for t in _tensors_in_creation_order(model)):
            model.to("meta")
        if program.quant != "none" and program.trainer == "trl":
            # trl 1.16.0 sft_trainer.py: a quantized model's trainable parameters (DoRA's magnitude aside) to bf16
            for name, parameter in model.named_parameters():
                if parameter.requires_grad and "magnitude" not in name:
                    parameter.data = parameter.data.to(torch.bfloat16)

    tracker = StorageTracker(vocab_size=program.config.vocab_size, nonzero_rows=nonzero_rows)
    if program.quant != "none":
        from peftpick.estimator.quantized import dequantization_output, dequantization_temporaries

        tracker.temporaries = dequantization_temporaries
        tracker.output_tag = dequantization_output
    with tracker, _meta_autocast():
        tracker.set_phase("build")
        for _ in range(CUBLAS_HANDLES):
            tracker.allocate(CUBLAS_WORKSPACE_BYTES, "overhead")
        for tensor in base_tensors + _tensors_in_creation_order(model):
            tracker.adopt(tensor)
        tracker.propagate_owner = True
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        unit_of = _attribute_layers(model, tracker, period)
        counts: dict[str, dict[int | None, int]] = {"trainable": {}, "total": {}, "saved_bytes": {}}
        counts["layout"] = parameter_shapes(model)
        for p in model.parameters():
            unit = unit_of.get(id(p))
            counts["total"][unit] = counts["total"].get(unit, 0) + _weights_held(p)
            if p.requires_grad:
                counts["trainable"][unit] = counts["trainable"].get(unit, 0) + p.numel()
        layers_name = _decoder_layers_name(model)
        seen: set[int] = set()
        for name, tensor in _saved_tensors(model, program.peft_config is None, trainable):
            storage = tensor.untyped_storage()._cdata
            if storage in seen:  # tied weights are written once
                continue
            seen.add(storage)
            unit = _unit_of_name(name, layers_name, period)
            nbytes = tensor.numel() * tensor.element_size()
            counts["saved_bytes"][unit] = counts["saved_bytes"].get(unit, 0) + nbytes
        full = program.peft_config is None
        for p in model.parameters():
            tracker.tag(p, "adapter" if p.requires_grad and not full else "weights")
        for b in model.buffers():
            tracker.tag(b, "weights")
        if program.quant != "none":
            for module in model.modules():
                for t in [*_quantized_weight(module), *quantization_state(module)]:
                    tracker.tag(t, "quantized weights")
            for p in model.parameters():
                if id(p) in upcast and not p.requires_grad:
                    tracker.tag(p, "fp32 upcasts")
        optimizer = _make_optimizer(model, trainable, program)

        out = None
        for step in range(program.steps):
            tracker.set_phase(f"forward{step}")
            x = torch.randint(0, program.config.vocab_size, (program.batch_size, program.seq_len), device="meta")
            with KernelStandIns():
                loss, kept = _forward(model, x, program)
            out = kept  # the plain loop holds the model output until the next step rebinds it
            del kept
            tracker.set_phase(f"backward{step}")
            loss.backward()
            del loss
            tracker.set_context(None)
            for p in trainable:
                if p.grad is not None:
                    tracker.tag(p.grad, "grads")
            tracker.set_phase(f"optimizer{step}")
            # per-tensor norms on meta (CUDA would use one foreach kernel); both allocate only scalars
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            for value, _params in state_tensors(optimizer).values():
                tracker.tag(value, "optimizer")
            _own_optimizer_state(tracker, optimizer, unit_of, f"optimizer{step}")
            optimizer.zero_grad(set_to_none=True)
        counts["optimizer_state"] = {}
        counts["paged_state"] = {}
        for value, params in state_tensors(optimizer).values():
            units = {unit_of.get(id(p)) for p in params}
            unit = units.pop() if len(units) == 1 else None
            counts["optimizer_state"][unit] = counts["optimizer_state"].get(unit, 0) + value.untyped_storage().nbytes()
        for param, nbytes in paged_state_bytes(optimizer):
            unit = unit_of.get(id(param))
            counts["paged_state"][unit] = counts["paged_state"].get(unit, 0) + nbytes
        tracker.set_phase("end")  # what follows is the program ending, not training
        del out, x
    return tracker.trace, counts


def _peft_type(peft_config) -> str | None:
    value = getattr(peft_config, "peft_type", None)
    return None if value is None else str(getattr(value, "value", value))


def _mask_counts(peft_config):
    """How many elements the method's boolean masks select (torch.nonzero, x[mask]), as a function of the mask's
    shape; None when the method has no such masks."""
    peft_type = _peft_type(peft_config)
    if peft_type == "SHIRA":
        rank = peft_config.r
        return lambda shape: rank * (shape[0] + shape[1])  # PEFT's SHiRA masks hold r*(m+n) ones
    if peft_type == "WAVEFT":
        # WaveFT keeps the spectrum entries whose (offset) indices fall inside the padded matrix: its indices come
        # from randperm(out x in) and the padding only grows the matrix, so every entry is kept
        return lambda shape: math.prod(shape)
    return None


def _builds_on_meta(peft_config) -> bool:
    peft_type = _peft_type(peft_config)
    return peft_type in ("SHIRA", "BOFT") or (peft_type == "LORA" and getattr(peft_config, "init_lora_weights", None) == "mica")


@contextlib.contextmanager
def _value_free_setup(peft_config):
    """AdaMSS groups the rows of each base weight's top singular vectors into `num_subspaces` clusters with
    k-means, which needs the weights' values: on meta the clusters are taken as contiguous, equal-sized runs of
    rows. Their sizes always add up to the layer's output features, so with `subspace_rank` 1 (or subspaces of
    at least `subspace_rank` rows) the trainable parameters are exact and only the split of the per-subspace
    activations differs."""
    if _peft_type(peft_config) == "FROD":  # its decomposition and per-layer solve: estimator/frod.py
        from peftpick.estimator.frod import value_free_setup

        with value_free_setup(host_projections=True, offload_on_apply=False):
            yield
        return
    if _peft_type(peft_config) == "BOFT":
        with _vectorized_boft_permutations():
            yield
        return
    if _peft_type(peft_config) != "ADAMSS":
        yield
        return
    from unittest import mock

    import peft.tuners.adamss.layer as adamss_layer

    def equal_clusters(vt, num_subspaces, _iternum):
        rows = vt.shape[0]
        clusters = max(1, min(int(num_subspaces), rows))
        return torch.arange(rows) * clusters // rows, clusters

    with mock.patch.object(adamss_layer, "clustering_Z", equal_clusters):
        yield


@contextlib.contextmanager
def _vectorized_boft_permutations():
    """BOFT's `perm2mat` writes each 1 of an in_features x in_features permutation matrix with its own Python
    indexing op: about 1.5 s of a 2 s estimate on a 3B model. The same matrix is made with one indexed write, so
    the buffer and everything traced from it are unchanged (tests/test_estimator.py checks the values)."""
    from unittest import mock

    from peft.tuners.boft.layer import BOFTLayer

    def perm2mat(_layer, indices):
        return permutation_matrix(indices)

    with mock.patch.object(BOFTLayer, "perm2mat", perm2mat):
        yield


def permutation_matrix(indices) -> torch.Tensor:
    """The float32 matrix with a 1 at (i, indices[i]) for each row i, as PEFT's BOFTLayer.perm2mat builds it."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    matrix = torch.zeros((len(indices), len(indices)))
    matrix[torch.arange(len(indices)), indices] = 1
    return matrix


def _skip_deferred_setup(model) -> None:
    """KaSA replaces each base weight by its SVD truncation once, before training (deferred to the first forward
    when the adapter is made on meta). The truncated weight has the base weight's shape and dtype, so the
    training step is traced without it."""
    for module in model.modules():
        deferred = getattr(module, "_lora_kasa_truncation_deferred", None)
        if isinstance(deferred, set):
            deferred.clear()


def _forward(model, x, program: TrainingProgram):
    """(loss, what the loop keeps until the next step). The plain loop keeps the model output (its logits);
    transformers' Trainer and TRL's SFTTrainer compute the loss inside compute_loss, so the output is gone
    before backward. A fused loss kernel returns no logits at all."""
    if program.loss == "stock":
        output = model(input_ids=x, labels=x)
        loss = output.loss
    else:
        from peftpick.estimator.losses import fused_loss

        output = loss = fused_loss(program.loss, model, x)
    return loss, (output if program.trainer == "plain" else None)


class _MetaAutocast(torch.autocast):
    """torch.autocast that is a no-op for device_type "meta" (torch refuses that device type). PEFT's
    target_parameters LoRA (lora.ParamWrapper, MoE expert weights) opens `torch.autocast(W.device.type,
    enabled=False)` around its weight fold; on a GPU that disables autocast, which on meta there is none to do."""

    def __init__(self, device_type, *args, **kwargs):
        self._noop = device_type == "meta"
        if not self._noop:
            super().__init__(device_type, *args, **kwargs)

    def __enter__(self):
        return None if self._noop else super().__enter__()

    def __exit__(self, *exc):
        return None if self._noop else super().__exit__(*exc)


@contextlib.contextmanager
def _meta_autocast():
    from unittest import mock

    with mock.patch.object(torch, "autocast", _MetaAutocast):
        yield


@contextlib.contextmanager
def _one_thread():
    """Run CPU ops on one thread: they are tiny here, and a process whose OpenMP pool never started can still
    fork estimate workers safely (recommender.planning.WorkerPool)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _on_meta(mode) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(mode)
    stack.enter_context(torch.device("meta"))
    return stack


def _tensors_in_creation_order(model) -> list[torch.Tensor]:
    """Parameters and buffers module by module, as a model's constructor registers them, with a quantized
    layer's quantization state after its weight."""
    tensors = []
    for module in model.modules():
        tensors.extend(module.parameters(recurse=False))
        tensors.extend(quantization_state(module))
        tensors.extend(module.buffers(recurse=False))
    return tensors


def _weights_held(parameter: torch.Tensor) -> int:
    """Weights a parameter stands for: a packed 4-bit one holds two per element (its quant_state has the shape)."""
    state = getattr(parameter, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return parameter.numel()


def _quantized_weight(module) -> list[torch.Tensor]:
    weight = getattr(module, "weight", None)
    return [weight] if isinstance(weight, torch.Tensor) and weight.dtype in (torch.uint8, torch.int8) else []


def _saved_tensors(model, full: bool, trainable: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """What save_pretrained writes: PEFT's adapter state dict, or the whole model for full fine-tuning."""
    if full:
        return list(model.state_dict().items())
    from peft import get_peft_model_state_dict

    try:
        return list(get_peft_model_state_dict(model).items())
    except (NotImplementedError, RuntimeError):
        # Prompt-learning methods compute the saved embedding by running the prompt encoder on the CPU,
        # which meta tensors cannot do; what they save is exactly their trainable parameters.
        return [("", t) for t in trainable]


def parameter_shapes(model) -> dict[str | int, Any]:
    """[rows (dim 0), elements per row, bytes per element, trainable] of every parameter, keyed by decoder layer
    index ("root": outside the layers; "layer_class": the layers' class name), each parameter once (tied weights are one). FSDP2 wraps each decoder
    layer and the root, and shards every parameter along dim 0 (estimator.sharding)."""
    layers = decoder_layers(model)
    layer_of = {id(p): index for index, layer in enumerate(layers or ()) for p in layer.parameters()}
    shapes: dict[str | int, Any] = {"root": [], "layer_class": type(layers[0]).__name__ if layers else ""}
    for p in model.parameters():  # yields a tied parameter once
        rows = p.shape[0] if p.dim() else 1
        entry = [int(rows), int(p.numel() // max(rows, 1)), int(p.element_size()), int(p.requires_grad)]
        shapes.setdefault(layer_of.get(id(p), "root"), []).append(entry)
    return shapes


def _decoder_layers_name(model) -> str | None:
    layers = decoder_layers(model)
    return next((name for name, module in model.named_modules() if module is layers), None)


def _unit_of_name(name: str, layers_name: str | None, period: int) -> int | None:
    """Unit of a state-dict entry, from its key (PEFT keeps module paths, minus the adapter name)."""
    if not layers_name:
        return None
    for prefix in (layers_name + ".", layers_name.removeprefix("base_model.model.") + "."):
        if prefix in name:
            index = name.split(prefix, 1)[1].split(".", 1)[0]
            return int(index) // period if index.isdigit() else None
    return None


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The model's list of decoder layers: the longest ModuleList of identical block types."""
    best = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    return best


def _attribute_layers(model, tracker: StorageTracker, period: int, hooks: bool = True) -> dict[int, int]:
    """Mark which unit of `period` layers owns each parameter, and make the tracker follow which unit's code
    runs: forward hooks enter and leave a unit; in backward, the gradient of a unit's output marks the start of
    its backward, and the gradient of the first layer's input its end."""
    layers = decoder_layers(model)
    unit_of: dict[int, int] = {}
    if layers is None:
        return unit_of
    for index, layer in enumerate(layers):
        unit = index // period
        state = [t for module in layer.modules() for t in quantization_state(module)]
        for tensor in list(layer.parameters()) + list(layer.buffers()) + state:
            unit_of[id(tensor)] = unit
            tracker.set_owner(tensor, unit)
        if not hooks:
            continue

        def enter(_module, args, kwargs, unit=unit, first=index == 0):
            tracker.push_context(unit)
            if first:
                hidden = args[0] if args else kwargs.get("hidden_states")
                if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                    hidden.register_hook(lambda _grad: tracker.set_context(None))

        def leave(_module, _args, output, unit=unit, last_of_unit=index % period == period - 1):
            tracker.pop_context()
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if last_of_unit and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda _grad: tracker.set_context(unit))

        layer.register_forward_pre_hook(enter, with_kwargs=True)
        layer.register_forward_hook(leave)
    return unit_of


def _make_optimizer(model, trainable, program: TrainingProgram):
    return make_optimizer(program.optimizer, model, trainable, peft_config=program.peft_config,
                          lr=program.learning_rate, weight_decay=program.weight_decay)


def _own_optimizer_state(tracker: StorageTracker, optimizer, unit_of: dict[int, int], phase: str) -> None:
    """Give optimizer state made from no tensor of its parameter (bitsandbytes' absmax vectors,
    `torch.zeros(shape).to(grad)` in Adafactor) the unit of its parameter, as state made by `zeros_like(p)`
    gets it, so that lengthening repeats it with the layers. State shared by several parameters (bitsandbytes'
    quantization maps) stays outside the units."""
    trace = tracker.trace
    unit_of_handle: dict[int, int] = {}
    for value, params in state_tensors(optimizer).values():
        units = {unit_of.get(id(p)) for p in params}
        handle = tracker.handle_of(value)
        if handle is None or len(units) != 1 or None in units or handle in trace.owner:
            continue
        unit_of_handle[handle] = units.pop()
    if not unit_of_handle:
        return
    start = trace.marks.get(phase, 0)
    for index in range(start, len(trace.events)):
        kind, handle, nbytes, _context = trace.events[index]
        unit = unit_of_handle.get(handle)
        if unit is not None and kind == ALLOC:
            trace.events[index] = (kind, handle, nbytes, unit)
            trace.owner[handle] = unit
