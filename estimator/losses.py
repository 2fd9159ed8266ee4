"""Loss kernels that never build the full logits, as stand-ins with the allocations of the real CUDA code.

Neither kernel runs on the meta device (Liger's is Triton only; TRL's folds its tiles in Triton on CUDA and in
slower torch code elsewhere, which allocates more), so each is an autograd Function that allocates, in order,
what the kernel's Python driver allocates on CUDA, read from the source of the version named:

- `liger`: liger-kernel 0.8.5 `ops/fused_linear_cross_entropy.py` (fused_linear_cross_entropy_forward): the
  gradient is computed in the forward, a chunk of `chunk_size` x V logits at a time, chunk_size =
  next_power_of_2(ceil(BT / ceil(V / H))); `grad_input` (BT x H, input dtype), `grad_weight` (V x H, only for a
  trainable output head), `loss_1d` (BT float32) and the target mask live through the forward; the gradients
  are saved for backward, which only scales them in place. Applied by `apply_liger_kernel_to_<model>` (or
  `TrainingArguments(use_liger_kernel=True)`), for the model types in liger's MODEL_TYPE_TO_APPLY_LIGER_FN.
- `chunked`: TRL 1.16.0 `kernels/chunked_logprob.py` (ChunkedLogProbFunction, what SFTTrainer's fused LM head
  calls): tiles of 4096 tokens x 32768 vocabulary entries in one reused buffer, seven float32 running vectors per
  token; backward a float32 gradient of the hidden states (N x H) cast back to their dtype at the end.
"""

from __future__ import annotations

import math

import torch

from peftpick.estimator.liger_models import LIGER_MODEL_TYPES_0_8_5, liger_model_types  # noqa: F401 - re-exported

TRL_TOKEN_TILE = 4096  # trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE
TRL_VOCAB_TILE = 32768  # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE


def liger_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    increase = -(-vocab // hidden)
    chunk = 1 << max(0, math.ceil(math.log2(max(1, -(-tokens // increase)))))
    return min(chunk, tokens)


class _LigerFusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        tokens, _width = hidden.shape
        vocab = weight.shape[0]
        grad_input = torch.empty_like(hidden)
        grad_weight = torch.empty_like(weight) if weight.requires_grad else None
        loss_1d = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        target_mask = torch.empty(tokens, dtype=torch.bool, device=hidden.device)
        logits = torch.empty(liger_chunk_size(tokens, hidden.shape[1], vocab), vocab, dtype=hidden.dtype,
                             device=hidden.device)
        del logits, target_mask
        loss = loss_1d.sum()
        ctx.save_for_backward(grad_input, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_input, grad_weight = ctx.saved_tensors
        return grad_input, grad_weight, None  # scaled in place (element_mul_kernel)


class _ChunkedLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        tokens = hidden.shape[0]
        device = hidden.device
        running = [torch.empty(tokens, dtype=torch.float32, device=device) for _ in range(7)]
        tile = torch.empty(min(tokens, TRL_TOKEN_TILE), TRL_VOCAB_TILE, dtype=hidden.dtype, device=device)
        if weight.dtype != hidden.dtype:  # weight[start:end].to(compute_dtype), one tile of rows at a time
            torch.empty(min(weight.shape[0], TRL_VOCAB_TILE), weight.shape[1], dtype=hidden.dtype, device=device)
        del tile
        log_z = torch.empty(tokens, dtype=torch.float32, device=device)
        logprobs = torch.empty(tokens, dtype=torch.float32, device=device)
        entropy = torch.empty(tokens, dtype=torch.float32, device=device)
        is_top1 = torch.empty(tokens, dtype=torch.bool, device=device)
        del running, is_top1
        ctx.save_for_backward(hidden, weight, log_z, entropy)
        ctx.weight_needs_grad = weight.requires_grad
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, _log_z, _entropy = ctx.saved_tensors
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = (torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
                       if ctx.weight_needs_grad else None)
        tile = torch.empty(min(hidden.shape[0], TRL_TOKEN_TILE), TRL_VOCAB_TILE, dtype=hidden.dtype,
                           device=hidden.device)
        del tile
        grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None


def fused_loss(kernel: str, model, input_ids: torch.Tensor):
    """The language-model loss of `model` on `input_ids` (labels = inputs) through `kernel` ("liger" or
    "chunked"): the decoder's hidden states go straight into the fused kernel with the output head's weight."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    weight = base.get_output_embeddings().weight
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    if kernel == "liger":
        # LigerForCausalLMLoss: labels shifted by padding, hidden states flattened (a view)
        targets = torch.nn.functional.pad(input_ids, (0, 1), value=-100)[..., 1:].contiguous().view(-1)
        return _LigerFusedLinearCrossEntropy.apply(hidden.view(-1, hidden.shape[-1]), weight, targets)
    # TRL _fused_forward: hidden_states[:, :-1]; on CUDA only labelled positions, gathered (a copy)
    shifted = hidden[:, :-1]
    gathered = shifted.reshape(-1, hidden.shape[-1]).clone()
    targets = input_ids[:, 1:].reshape(-1)
    logprobs = _ChunkedLogProb.apply(gathered, weight, targets)
    return (-logprobs).sum() / targets.numel()
