"""FRoD on the meta device: its set-up with shapes only, and its training step with the tensors it holds.

FRoD (peft/tuners/frod, peft 0.21.2; the same training path as the commits the PEFT suite ran, 194cb8fe and
d787f51b) replaces a targeted weight W (out x in) by U (S + diag(lambda_l)) V^T:

* V (in x in, the base dtype): one per module *category* (`q_proj` of every layer shares one), from a joint
  decomposition of the stacked base weights of that category (`_projection_from_weights`: QR / SVD / eigh in
  float32 on the CPU). A buffer of the tuner (`base_model.frod_V.<category>`), not of the layers; with it the COO
  pattern of S: `frod_s_indices` (2 x nnz int64, nnz = min(int(in * in * sparse_rate), in * in - in), at least
  1) and `frod_s_size` ([in, in], int64).
* U (out x in, the base dtype): per layer, a non-persistent buffer `frod_U`, solved from W and V in float64.
* trainable: `frod_lambda_l` (in) and `frod_lambda_s_values` (nnz), float32 under autocast_adapter_dtype.

Where these live on a GPU depends on the program. PEFT moves each new layer's `frod_`-named submodules to its base
weight's device (tuners_utils `_replace_module`), so U follows the base weight; FRoD's own
`_move_adapter_to_device_of_base_layer` moves only the two trainable vectors, so the tuner-level V, indices and
size stay on the CPU unless the user moves the whole model after `get_peft_model`:

* a causal LM loaded onto the GPU, then wrapped (from_pretrained(device_map="cuda"); the PEFT MetaMathQA suite,
  benchmarks/measure_peaks.py): V and the indices stay on the CPU and every forward of every layer copies them to
  the GPU (`.to(device=x.device)`), and autograd keeps those copies until the layer's backward;
* a denoiser wrapped on the CPU, then moved (`transformer.to("cuda")`, the PEFT image-generation suite): V, the
  indices and the size live on the GPU once per category.

`runtime_offload_base_weight` (default False; True in every FRoD run of the PEFT suite) keeps each targeted base
weight on the CPU: `Linear._apply` moves it back after every `module.to(...)`, and a forward that does not need it
(one adapter, no dropout in training) moves it there before computing. Loaded then wrapped, the base weights are
on the GPU until the first forward frees them; moved after wrapping, they never stay there.

The forward (`Linear.forward`, one adapter, no dropout) casts the trainable vectors to the activations' dtype,
builds S = sparse_coo_tensor(indices, values).coalesce(), and computes U((x V) S^T + (x V) * lambda_l) with S made
dense (`S.to_dense()`) for bfloat16 / float16 activations; it never reads W. Neither the COO ops nor `.tolist()`
of the size run on the meta device. The stand-ins here allocate what the CUDA kernels do:

* `_coalesce_sparse_cuda` (aten/src/ATen/native/sparse/cuda/SparseCUDATensor.cu): three nnz int64 work
  buffers (flattened indices, the sort permutation, unique offsets) and thrust's sort_by_key buffer (a second
  copy of keys and values, 2 x nnz int64) while it runs; new indices (2 x nnz int64) and values (nnz) kept;
* `to_dense` of the coalesced S: an in x in zeros (add_out_dense_sparse_cuda adds a coalesced operand in
  place), kept by autograd with S for the backward of `z @ S^T`;
* its backward, `grad.sparse_mask(S)` (dense x sparse intersection: a gather, a clone of the indices, the
  product), and the COO constructor's backward, a sparse-sparse `sparse_mask` (hashes, sort, intersection
  buffers: approximated as 8 x nnz int64 of work buffers), each of which hands on nnz values.

The decomposition is replaced by tensors of the right shapes and dtypes, which `empty` leaves unset: the trace
needs no value of them.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from typing import Any

import torch
from torch import nn

# ------------------------------------------------------------------------------------------ placeholders

# Placeholders: a 0-dim storage expanded to a tensor of the right shape and dtype, which holds (next to) no
# memory. The offloaded base weights of all layers share one meta storage per dtype, made before any trace starts
# (no tracker sees it allocated); host tensors get a storage each, as save_pretrained counts tensors by storage.
_SCALARS: dict[torch.dtype, torch.Tensor] = {}


def _offloaded_weight(shape, dtype: torch.dtype) -> torch.Tensor:
    scalar = _SCALARS.get(dtype)
    if scalar is None:
        scalar = _SCALARS[dtype] = torch.empty((), dtype=dtype, device="meta")
    return scalar.expand(tuple(shape))


def _on_host(shape, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of `shape` and `dtype` that holds no memory (its values are never read)."""
    return torch.empty((), dtype=dtype, device="cpu").expand(tuple(shape))


@functools.cache
def _host_buffers():
    """A BufferDict that stays where it is (the CPU) when the model is moved: FRoD's tuner-level projections in a
    program that wraps a model already on the GPU, where nothing moves them afterwards."""
    from peft.tuners._buffer_dict import BufferDict

    class HostBufferDict(BufferDict):
        def _apply(self, fn, recurse=True):  # noqa: ARG002 - keeps its CPU tensors
            return self

    return HostBufferDict


# ------------------------------------------------------------------------------------------ set-up


def nnz_of(in_dim: int, sparse_rate: float) -> int:
    """Entries of S that FRoD trains (peft/tuners/frod/model.py `_init_frod_projections`)."""
    off_diagonal = in_dim * in_dim - in_dim
    nnz = min(int(in_dim * in_dim * sparse_rate), off_diagonal)
    if sparse_rate > 0 and off_diagonal > 0:
        nnz = max(1, nnz)
    return nnz


def _init_projections(self, config, adapter_name: str, *, host: bool) -> None:
    """FrodModel._init_frod_projections with shapes only: the same targets, categories, V (in x in, in the
    category's weight dtype), COO indices (2 x nnz int64) and size ([in, in] int64), as placeholders."""
    from transformers.pytorch_utils import Conv1D

    from peft.tuners.frod.model import _category_from_key, _layer_index_from_key
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    model_config = self.get_model_config(self.model)
    peft_config = self._prepare_adapter_config(config, model_config)
    peft_config = _maybe_include_all_linear_layers(peft_config, self.model)

    weights: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    fallback_index = 0
    for key, module in self.model.named_modules():
        if not self._check_target_module_exists(peft_config, key):
            continue
        if isinstance(module, nn.Linear):
            weight = module.weight
        elif isinstance(module, Conv1D):
            weight = module.weight.T
        else:
            continue
        layer_idx = _layer_index_from_key(key, fallback_index)
        fallback_index += 1
        weights[layer_idx][_category_from_key(key)] = weight
    if not weights:
        raise ValueError("No layer types compatible with FRoD were found. Please check `peft_config.target_modules`.")

    if not hasattr(self, "frod_V"):
        self.frod_V = nn.ModuleDict()
        self.frod_s_indices = nn.ModuleDict()
        self.frod_s_size = nn.ModuleDict()

    def buffers():
        if host:
            return _host_buffers()({}, persistent=config.save_projection)
        from peft.tuners._buffer_dict import BufferDict

        return BufferDict({}, persistent=config.save_projection)

    for category in sorted({category for layer_dict in weights.values() for category in layer_dict}):
        matrices = [layer_dict[category] for _, layer_dict in sorted(weights.items()) if category in layer_dict]
        in_dims = {int(w.shape[1]) for w in matrices}
        if len(in_dims) > 1:  # torch.cat(matrices, dim=0) in _projection_from_weights refuses them
            raise RuntimeError(f"FRoD stacks the weights of category {category!r}, whose input sizes differ: "
                               f"{sorted(in_dims)}")
        in_dim = in_dims.pop()
        dtype = next(layer_dict[category] for layer_dict in weights.values() if category in layer_dict).dtype
        nnz = nnz_of(in_dim, config.sparse_rate)
        for name, tensor in (("frod_V", _on_host((in_dim, in_dim), dtype)),
                             ("frod_s_indices", _on_host((2, nnz), torch.long)),
                             ("frod_s_size", _on_host((2,), torch.long))):
            container = getattr(self, name)
            if category not in container:
                container[category] = buffers()
            container[category][adapter_name] = tensor


def _u_and_lambda(self, V, W):  # noqa: ARG001 - FrodLayer._calculate_frod_u_and_lambda with shapes only
    """U (out x in) and lambda_l (in): solved from W and V in float64, returned in float32, then cast by
    update_layer to the base dtype (U) and stored. U is made in W's dtype here, which that cast leaves as is."""
    return _on_host(W.shape, W.dtype), _on_host((W.shape[1],), torch.float32)


@contextlib.contextmanager
def value_free_setup(host_projections: bool, offload_on_apply: bool):
    """`get_peft_model` with a FRoD config, its set-up steps that need the base weights' values replaced by
    ones that need their shapes, and each new FRoD layer given the meta-device training stand-ins.

    host_projections: V, the COO indices and size stay on the CPU (a model wrapped on the GPU); else they are
        moved with the model. offload_on_apply: with runtime_offload_base_weight, `module.to(...)` after wrapping
        moves the targeted base weights back to the CPU (a model wrapped on the CPU, then moved); else they leave
        the GPU at the first forward."""
    from unittest import mock

    from peft.tuners.frod.layer import FrodLayer
    from peft.tuners.frod.model import FrodModel

    original_update = FrodLayer.update_layer

    def init_projections(self, config, adapter_name):
        _init_projections(self, config, adapter_name, host=host_projections)

    def update_layer(self, adapter_name, *args, **kwargs):
        original_update(self, adapter_name, *args, **kwargs)
        install(self, offload_on_apply)

    with mock.patch.object(FrodModel, "_init_frod_projections", init_projections), \
            mock.patch.object(FrodLayer, "_calculate_frod_u_and_lambda", _u_and_lambda), \
            mock.patch.object(FrodLayer, "update_layer", update_layer):
        yield


# ------------------------------------------------------------------------------------------ training step


class _CoalescedS:
    """What `torch.sparse_coo_tensor(indices, values, size).coalesce()` gives the forward: the coalesced
    indices and values (the tensors CUDA allocates), as plain meta tensors."""

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, size: int, grads: dict):
        self.indices, self.values, self.size, self.grads = indices, values, size, grads

    def _nnz(self) -> int:
        return int(self.values.shape[0])

    def to_dense(self) -> torch.Tensor:
        return _ToDense.apply(self.values, self.indices, self.size, self.grads)


def _long(*shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.long, device=like.device)


class _Coalesce(torch.autograd.Function):
    """sparse_coo_tensor(indices, values, (n, n)).coalesce(): the constructor aliases its operands and keeps
    `indices` for its backward; `_coalesce_sparse_cuda` works in nnz-sized int64 buffers and returns new indices
    and values. Backward: the constructor's `sparse_constructor_values_backward`, a sparse-sparse sparse_mask."""

    @staticmethod
    def forward(ctx, values, indices, grads):
        nnz = values.shape[0]
        if nnz < 2:  # nnz < 2: self.clone()
            new_indices, new_values = torch.empty_like(indices), torch.empty_like(values)
        else:
            flat, order, offsets = _long(nnz, like=values), _long(nnz, like=values), _long(nnz, like=values)
            sort_buffer = _long(2 * nnz, like=values)  # thrust::sort_by_key (CUB radix sort): keys + values copy
            del sort_buffer
            new_values = torch.empty_like(values)
            new_indices = _long(2, nnz, like=values)
            del flat, order, offsets
        ctx.save_for_backward(indices)
        ctx.grads = grads
        ctx.mark_non_differentiable(new_indices)
        ctx.set_materialize_grads(False)  # no zeros for the indices' gradient
        return new_values, new_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        (indices,) = ctx.saved_tensors
        nnz = grad_values.shape[0]
        work = [_long(nnz, like=grad_values) for _ in range(8)]  # hashes, sort, intersection buffers
        mask_indices = torch.empty_like(indices)  # the result's indices (a clone), dropped by _values()
        values = torch.empty_like(grad_values)
        del work, mask_indices
        ctx.grads.pop("indices", None)  # the sparse gradient from to_dense's backward is consumed
        return values, None, None


class _ToDense(torch.autograd.Function):
    """S.to_dense() of the coalesced S: zeros (n, n) plus an in-place add; autograd keeps S (its indices and
    values) for the backward, `grad.sparse_mask(S)`: t.mul(S-shaped template) gathers nnz entries, clones the
    indices and multiplies, handing on a sparse gradient."""

    @staticmethod
    def forward(ctx, values, indices, size, grads):
        dense = torch.zeros((size, size), dtype=values.dtype, device=values.device)
        ctx.save_for_backward(values, indices)
        ctx.grads = grads
        return dense

    @staticmethod
    def backward(ctx, grad_dense):
        values, indices = ctx.saved_tensors
        one = torch.ones(1, dtype=grad_dense.dtype, device=grad_dense.device)  # the mask template's values
        gathered = torch.empty_like(values, dtype=grad_dense.dtype)  # d.index(indices)
        ctx.grads["indices"] = torch.empty_like(indices)  # s_indices.clone(), lives with the sparse gradient
        product = torch.empty_like(gathered)
        del one, gathered
        return product, None, None, None


class _SparseMatmul(torch.autograd.Function):
    """torch.sparse.mm(S, z.t()).t() (float32 activations; cuSPARSE SpMM): the (n, T) product; backward: the
    dense gradient of S (grad @ z, n x n) masked to its nnz entries, and S^T @ grad for z. cuSPARSE's work
    buffers and CSR conversion are not modelled."""

    @staticmethod
    def forward(ctx, values, z_flat, indices, size):
        ctx.save_for_backward(values, indices, z_flat)
        ctx.size = size
        return torch.empty((size, z_flat.shape[0]), dtype=z_flat.dtype, device=z_flat.device).t()

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, z_flat = ctx.saved_tensors
        grad_values = grad_z = None
        if ctx.needs_input_grad[0]:
            dense = grad_out.t() @ z_flat  # (n, T) @ (T, n)
            grad_values = torch.empty_like(values)
            del dense
        if ctx.needs_input_grad[1]:
            grad_z = torch.empty((ctx.size, z_flat.shape[0]), dtype=z_flat.dtype, device=z_flat.device).t()
        return grad_values, grad_z, None, None


def _get_frod_tensors(self, adapter: str, *, device: torch.device, dtype: torch.dtype):
    """Linear._get_frod_tensors: the same `.to()` calls (copies where V or the indices live on the CPU), the
    size read from V's shape (frod_s_size holds [in, in]) and the coalesced S as its CUDA kernel allocates it."""
    U = self.frod_U[adapter].to(device=device, dtype=dtype)
    V = self.frod_V[adapter].to(device=device, dtype=dtype)
    indices = self.frod_s_indices[adapter].to(device=device, dtype=torch.long)
    values = self.frod_lambda_s_values[adapter].to(device=device, dtype=dtype)
    lambda_l = self.frod_lambda_l[adapter].to(device=device, dtype=dtype)
    grads: dict = {}
    new_values, new_indices = _Coalesce.apply(values, indices, grads)
    return U, V, _CoalescedS(new_indices, new_values, int(V.shape[0]), grads), lambda_l


def _sparse_activation_mm(self, z_flat: torch.Tensor, S: _CoalescedS) -> torch.Tensor:  # noqa: ARG001
    if S._nnz() == 0:
        return torch.zeros_like(z_flat)
    if z_flat.dtype in (torch.float16, torch.bfloat16):
        return z_flat @ S.to_dense().t()
    return _SparseMatmul.apply(S.values, z_flat, S.indices, S.size)


def _offloaded(layer) -> bool:
    storage = layer.get_base_layer().weight.untyped_storage()
    return storage._cdata == layer._peftpick_host_weight.untyped_storage()._cdata


def _offload_base_weight_to_cpu(self) -> None:
    """Linear._offload_base_weight_to_cpu: the weight leaves the GPU (its storage is dropped; the parameter
    keeps its shape and dtype). A call from `_apply` counts only where the program moves the model after
    wrapping it (`offload_on_apply`)."""
    if self._peftpick_applying and not self._peftpick_offload_on_apply:
        return
    weight = self.get_base_layer().weight
    if weight.device.type == "meta" and not _offloaded(self):
        weight.data = self._peftpick_host_weight


def _move_base_weight_to_device(self, device: torch.device) -> None:
    """Linear._move_base_weight_to_device: an offloaded weight comes back (one allocation of its size); any
    other meta weight is where it belongs (the original returns for meta weights too)."""
    if _offloaded(self):
        weight = self.get_base_layer().weight
        weight.data = torch.empty(weight.shape, dtype=weight.dtype, device=device)


def install(layer, offload_on_apply: bool) -> None:
    """Give one FRoD layer (on the meta device) the stand-ins above, as instance attributes."""
    import types

    weight = layer.get_base_layer().weight
    object.__setattr__(layer, "_peftpick_offload_on_apply", offload_on_apply)
    object.__setattr__(layer, "_peftpick_applying", False)
    object.__setattr__(layer, "_peftpick_host_weight", _offloaded_weight(weight.shape, weight.dtype))
    for name, function in (("_get_frod_tensors", _get_frod_tensors),
                           ("_sparse_activation_mm", _sparse_activation_mm),
                           ("_offload_base_weight_to_cpu", _offload_base_weight_to_cpu),
                           ("_move_base_weight_to_device", _move_base_weight_to_device)):
        object.__setattr__(layer, name, types.MethodType(function, layer))
    cls_apply = type(layer)._apply

    def _apply(fn, recurse=True):
        object.__setattr__(layer, "_peftpick_applying", True)
        try:
            return cls_apply(layer, fn, recurse)
        finally:
            object.__setattr__(layer, "_peftpick_applying", False)

    object.__setattr__(layer, "_apply", _apply)


def notes(peft_config: Any, *, moved_after_wrapping: bool) -> tuple[str, ...]:
    """The assumptions of a FRoD estimate (estimable.stand_in_notes for the causal-LM program)."""
    offload = bool(getattr(peft_config, "runtime_offload_base_weight", False))
    dropout = float(getattr(peft_config, "frod_dropout", 0.0) or 0.0)
    where = ("V, the COO indices and size moved to the GPU with the model, once per module category"
             if moved_after_wrapping else
             "V (in x in) and the COO indices stay on the CPU (PEFT never moves them): every forward of every "
             "targeted layer copies them to the GPU, and autograd keeps the copies until that layer's backward")
    if not offload:
        base = "runtime_offload_base_weight off: the targeted base weights stay on the GPU, unused by the forward"
    elif dropout > 0:
        base = ("runtime_offload_base_weight with frod_dropout > 0: every training forward runs the base layer, "
                "so the targeted base weights are on the GPU (FRoD moves them there) and counted")
    else:
        base = ("runtime_offload_base_weight: the targeted base weights are on the CPU during training and not "
                "counted" + ("" if moved_after_wrapping else " after the first forward (which moves them there)"))
    return ("FRoD: the joint decomposition of each category's stacked base weights and each layer's float64 "
            "solve for U are replaced by tensors of their shapes and dtypes (V in x in and U out x in in the base "
            "dtype, trainable lambda_l and S values in float32); the set-up's CPU / float64 copies are not in the "
            "peak",
            "FRoD: " + where + "; U (out x in) on the GPU per layer",
            "FRoD: " + base,
            "FRoD: S's COO coalesce and sparse_mask backward allocated as their CUDA kernels do (work buffers of "
            "the sparse-sparse mask approximated); bf16/fp16 activations multiply by the dense S (in x in)")
