"""Stand-ins for CUDA kernels whose memory the meta device cannot show.

Sparse tensors have no meta kernels either: SHiRA adds a sparse update to a dense copy of each weight. On CUDA
`dense += sparse` scatters into the dense tensor in place; the stand-in gives `sparse_coo_tensor` a dense view
with no storage, so the add allocates nothing, and backward returns one gradient per stored value.

`scaled_dot_product_attention` on the meta device (and on CPU) falls back to the math implementation, which
materialises the (batch, heads, seq, seq) score matrix; on a CUDA GPU the fused kernels (flash / cuDNN /
memory-efficient) keep only the output and a per-row log-sum-exp for backward, and allocate their
gradient buffers inside the kernel call. `FusedAttentionMode` routes SDPA calls to an autograd function
that allocates exactly those tensors, with the same lifetimes, so the tracer sees what the GPU would hold.

Some CUDA kernels also take buffers from the caching allocator inside the call and free them before returning,
which their meta kernels never make: cuFFT's work area (2-D FFTs such as FourierFT's ifft2 of every delta
weight) and cuBLAS's contiguous copies of matmul operands it cannot read with their strides (the bmm behind
C3A's block-circulant einsum). `cuda_temporaries` gives their sizes; the denoiser's tracker logs them.
"""

from __future__ import annotations

import math

import torch
from torch.overrides import TorchFunctionMode

_SDPA = torch.nn.functional.scaled_dot_product_attention


def _round_up(x: int, m: int) -> int:
    return m * math.ceil(x / m)


class _FusedAttention(torch.autograd.Function):
    """Memory model of the fused SDPA kernels (shapes only; values are meaningless on meta)."""

    @staticmethod
    def forward(ctx, query, key, value, mask):
        batch, heads, seq_q, head_dim = query.shape
        # Output is laid out (batch, seq, heads, dim) and returned transposed; the log-sum-exp is fp32.
        out = torch.empty((batch, seq_q, heads, value.shape[-1]), dtype=query.dtype, device=query.device)
        out = out.transpose(1, 2)
        lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.has_mask = mask is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        batch, heads, seq_q, head_dim = query.shape
        kv_heads, seq_k = key.shape[1], key.shape[2]
        device = query.device
        # Row-wise dot(dO, O) and the fp32 dQ accumulator, on rows padded to the kernel's tile (128).
        seq_q_tiles = _round_up(seq_q, 128)
        softmax_d = torch.empty((batch, heads, seq_q_tiles), dtype=torch.float32, device=device)
        dq_accum = torch.empty(
            (batch, seq_q_tiles, heads, _round_up(head_dim, 32)), dtype=torch.float32, device=device
        )
        dq = torch.empty((batch, seq_q, heads, head_dim), dtype=query.dtype, device=device)
        if kv_heads != heads:
            # Grouped-query attention: gradients are computed per query head, then summed per group.
            dk_full = torch.empty((batch, seq_k, heads, head_dim), dtype=key.dtype, device=device)
            dv_full = torch.empty((batch, seq_k, heads, value.shape[-1]), dtype=value.dtype, device=device)
            dk = torch.empty((batch, seq_k, kv_heads, head_dim), dtype=key.dtype, device=device)
            dv = torch.empty((batch, seq_k, kv_heads, value.shape[-1]), dtype=value.dtype, device=device)
            del dk_full, dv_full
        else:
            dk = torch.empty((batch, seq_k, kv_heads, head_dim), dtype=key.dtype, device=device)
            dv = torch.empty((batch, seq_k, kv_heads, value.shape[-1]), dtype=value.dtype, device=device)
        del softmax_d, dq_accum
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


class _SparseUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, values, size):
        ctx.values_shape = values.shape
        return values.new_empty(()).expand(size)

    @staticmethod
    def backward(ctx, grad):
        # the gradient of each stored value is the dense gradient gathered at its index
        return None, grad.new_empty(ctx.values_shape), None


class _BlockDiag(torch.autograd.Function):
    """torch.block_diag of many equal blocks (BOFT's butterfly factors): one dense output, and in backward the
    blocks' gradients in one buffer. Same allocations as the decomposed op, without one Python call per block."""

    @staticmethod
    def forward(ctx, *blocks):
        ctx.block_shape = blocks[0].shape
        ctx.count = len(blocks)
        rows = sum(b.shape[0] for b in blocks)
        cols = sum(b.shape[1] for b in blocks)
        return blocks[0].new_empty((rows, cols))

    @staticmethod
    def backward(ctx, grad):
        grads = grad.new_empty((ctx.count, *ctx.block_shape))
        return grads.unbind(0)  # views of one buffer, as before; one op instead of one per block


class _StackedBlockDiag(torch.autograd.Function):
    """torch.block_diag(*torch.unbind(stacked)) (BOFT without its CUDA extension) as one op on `stacked`: the
    dense output, and in backward the stacked blocks' gradient, the one buffer CUDA allocates there (block_diag's
    backward slices the output gradient; unbind's stacks those slices). Autograd then never handles one gradient
    per block, which costs a Python call per block per layer."""

    @staticmethod
    def forward(ctx, stacked):
        ctx.stacked_shape = stacked.shape
        count, rows, cols = stacked.shape
        return stacked.new_empty((count * rows, count * cols))

    @staticmethod
    def backward(ctx, grad):
        return grad.new_empty(ctx.stacked_shape)


def _unbound_from(blocks) -> torch.Tensor | None:
    """The tensor that `blocks` are torch.unbind(tensor) of, as (blocks, rows, cols), or None when they are not
    all the consecutive dim-0 slices of one contiguous tensor, or were cut another way (blocks indexed one by one,
    as OFT's are, each have a backward of their own that allocates: that stays traced)."""
    first = blocks[0]
    base = first._base
    if base is None or first.dim() != 2 or not base.is_contiguous() or base.numel() != len(blocks) * first.numel():
        return None
    if first.grad_fn is not None and not type(first.grad_fn).__name__.startswith("UnbindBackward"):
        return None
    size, offset = first.numel(), base.storage_offset()
    for index, block in enumerate(blocks):
        if (block._base is not base or block.shape != first.shape or not block.is_contiguous()
                or block.storage_offset() != offset + index * size):
            return None
    return base.view(len(blocks), *first.shape)


def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if not enable_gqa and key.shape[1] != query.shape[1]:
        raise ValueError("key/value heads differ from query heads without enable_gqa")
    return _FusedAttention.apply(query, key, value, attn_mask)


class KernelStandIns(TorchFunctionMode):
    """Within this mode, SDPA calls allocate what a fused CUDA attention kernel allocates, sparse updates what
    an in-place sparse add allocates, and block_diag of many blocks what BOFT's block-diagonal kernel does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return fused_sdpa(*args, **kwargs)
        if func is torch.block_diag and len(args) > 8 and args[0].device.type == "meta":
            stacked = _unbound_from(args)
            if stacked is not None:
                return _StackedBlockDiag.apply(stacked)
            if len({tuple(a.shape) for a in args}) == 1:
                return _BlockDiag.apply(*args)
        if func is torch.sparse_coo_tensor and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
            indices, values = args[0], args[1]
            size = args[2] if len(args) > 2 else kwargs["size"]
            return _SparseUpdate.apply(indices, values, tuple(size))
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------------------ library temporaries
#
# Some CUDA kernels allocate buffers through the caching allocator inside the call and free them before they
# return; the meta kernels of the same operators only make the output. `cuda_temporaries(func, args, out)` says
# which: the byte sizes of (work areas, copies) the CUDA kernel of `func` allocates after `out` and frees before
# returning. The tracer logs them as allocations freed at once (they raise the peak of that moment only).

_aten = torch.ops.aten


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """c10 TensorImpl::compute_non_overlapping_and_dense: some permutation of the dims is contiguous."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _matrix_copy(t: torch.Tensor) -> int:
    """aten/src/ATen/native/cuda/Blas.cpp prepare_matrix_for_cublas: an mm operand that is neither dense nor
    a column- or row-major matrix with a unit stride (a slice with gaps both ways) is cloned contiguous."""
    if t.dim() != 2 or _non_overlapping_and_dense(t):
        return 0
    (s0, s1), (n0, n1) = t.stride(), t.shape
    if (s0 == 1 and s1 >= max(1, n0)) or (s1 == 1 and s0 >= max(1, n1)):
        return 0
    return t.numel() * t.element_size()


def _batch_matrix_copy(t: torch.Tensor, transpose_result: bool, m: int, n: int) -> int:
    """Blas.cpp prepare_batch_matrix_for_cublas: a bmm operand whose matrices have no unit stride (with a
    leading stride that covers the other dim), and that is not contiguous, is cloned contiguous; a lazily
    conjugated operand read untransposed is conjugated into a copy (resolve_conj_if_indicated)."""
    strides = t.stride()
    fast, leading = (2, 1) if transpose_result else (1, 2)
    nbytes = t.numel() * t.element_size()
    if strides[fast] == 1 and strides[leading] >= max(1, m):
        return nbytes if t.is_conj() else 0
    if strides[leading] == 1 and strides[fast] >= max(1, n):
        return 0
    if t.is_contiguous() and strides[1] != 0 and strides[2] != 0:
        return nbytes if t.is_conj() and transpose_result else 0
    return nbytes


def _bmm_copies(batch1: torch.Tensor, batch2: torch.Tensor, result: torch.Tensor) -> list[int]:
    """Blas.cpp baddbmm_out_cuda_impl (bmm and baddbmm): the result is used in place when one of its matrix
    dims has a unit stride (a contiguous result: transposed, so cuBLAS computes result^T = batch2^T batch1^T),
    else a contiguous copy is computed and copied back; then each operand goes through
    prepare_batch_matrix_for_cublas."""
    strides, sizes = result.stride(), result.shape
    copies = []
    transpose = False
    if strides[1] == 1 and (sizes[2] == 1 or strides[2] >= max(1, sizes[1])):
        pass
    elif strides[2] == 1 and (sizes[1] == 1 or strides[1] >= max(1, sizes[2])):
        transpose = True
    else:
        copies.append(result.numel() * result.element_size())
    leading = 1 if transpose else 2
    m, n = sizes[2 if transpose else 1], sizes[leading]
    k = (batch2 if transpose else batch1).shape[leading]
    first, second = (batch2, batch1) if transpose else (batch1, batch2)
    copies.append(_batch_matrix_copy(first, transpose, m, k))
    copies.append(_batch_matrix_copy(second, transpose, k, n))
    return [c for c in copies if c]


def _complex_bytes(t: torch.Tensor) -> int:
    return t.element_size() * (1 if t.is_complex() else 2)


def _fft_work_area(x: torch.Tensor, dims, signal_numel: int) -> int:
    """The cuFFT work area of one plan (aten/src/ATen/native/cuda/SpectralOps.cpp _exec_fft: the plan is made
    with auto-allocation off, CuFFTPlanCache.h, and `workspace_size()` bytes are taken from the caching
    allocator for the call). Its size is cuFFT's; for 2-D and 3-D transforms cuFFT reports one complex buffer
    the size of the batched signal (cufftGetSize of 100 x 100k single-precision 2-D plans: 8 bytes x
    100 x 100k, arrayfire/arrayfire#1443; a 512 x 512 and a 512 x 512 x 32 batched plan allocate 2 MiB and
    64 MiB, JuliaGPU/CUDA.jl#894). 1-D transforms (C3A's block FFTs) are taken to need none: no report of
    their size was found, and their transforms of a few hundred points run in one pass."""
    if len(dims) < 2:
        return 0
    return signal_numel * _complex_bytes(x)


def _fft_c2c(args, out):
    x, dims = args[0], args[1]
    return [_fft_work_area(x, dims, x.numel())], []


def _fft_r2c(args, out):
    x, dims = args[0], args[1]
    return [_fft_work_area(x, dims, x.numel())], []


def _fft_c2r(args, out):
    x, dims = args[0], args[1]
    # SpectralOps.cpp _fft_c2r_cufft: "Complex to real FFTs may overwrite the input buffer, so must always clone"
    return [_fft_work_area(x, dims, out.numel())], [x.numel() * x.element_size()]


def _mm(args, out):
    return [], [_matrix_copy(args[0]), _matrix_copy(args[1])]


def _addmm(args, out):
    return [], [_matrix_copy(args[1]), _matrix_copy(args[2])]


def _bmm(args, out):
    return [], _bmm_copies(args[0], args[1], out)


def _baddbmm(args, out):
    return [], _bmm_copies(args[1], args[2], out)


_TEMPORARIES = {
    _aten._fft_c2c.default: _fft_c2c,
    _aten._fft_r2c.default: _fft_r2c,
    _aten._fft_c2r.default: _fft_c2r,
    _aten.mm.default: _mm,
    _aten.addmm.default: _addmm,
    _aten._addmm_activation.default: _addmm,
    _aten.bmm.default: _bmm,
    _aten.baddbmm.default: _baddbmm,
}


def cuda_temporaries(func, args, out) -> tuple[list[int], list[int]] | None:
    """(work areas, copies) in bytes that the CUDA kernel of `func` allocates after its output `out` and frees
    before returning, or None for an operator without such buffers (most)."""
    rule = _TEMPORARIES.get(func)
    if rule is None or not isinstance(out, torch.Tensor) or out.device.type != "meta":
        return None
    work, copies = rule(args, out)
    work, copies = [w for w in work if w], [c for c in copies if c]
    return (work, copies) if work or copies else None
