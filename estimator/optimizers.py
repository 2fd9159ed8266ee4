"""The optimizers of the traced training step, each run as its library runs it, on the meta device.

- "adamw": torch.optim.AdamW (multi-tensor). State: exp_avg and exp_avg_sq in the parameter's dtype.
- "sgd": torch.optim.SGD with momentum 0.9 (multi-tensor). State: one momentum buffer per parameter.
- "adafactor": transformers.optimization.Adafactor with the settings transformers' Trainer gives it
  (scale_parameter=False, relative_step=False, warmup_init=False, a fixed learning rate). It is pure torch and
  runs on meta unchanged. State, always float32: for parameters of 2 dimensions or more the factored second
  moment, a row vector (shape[:-1]) and a column vector (shape[:-2] + shape[-1:]); for 1-D parameters a
  full-size second moment; and a 0-dim "RMS" per parameter.
- "adamw-8bit" / "paged-adamw-8bit": bitsandbytes AdamW8bit / PagedAdamW8bit. Where bitsandbytes imports, its
  own classes run: their state initialisation (`Optimizer2State.init_state`) is the library's code; only the
  CUDA update kernel is replaced by a stand-in that updates in place and allocates nothing, which is what the
  kernel does. Where it does not import, `Modelled8bitAdamW` allocates the same tensors in the same order
  from the rule in bitsandbytes' source (`BNB_SOURCE`). Both give the same bytes (tests/test_optimizers.py).
- "lora-fa": PEFT's LoRA-FA optimizer (LoRA adapters only).
"""

from __future__ import annotations

import torch

from peftpick.types import Optimizer

OPTIMIZERS = tuple(member.value for member in Optimizer)
EIGHT_BIT = (Optimizer.ADAMW_8BIT.value, Optimizer.PAGED_ADAMW_8BIT.value)

SGD_MOMENTUM = 0.9

# bitsandbytes' 8-bit state rule (optim/optimizer.py, Optimizer2State.init_state and get_state_buffer, 0.50.2):
BNB_SOURCE = "bitsandbytes 0.50.2 source (optim/optimizer.py: Optimizer2State.init_state, get_state_buffer)"
BNB_BLOCKSIZE = 256  # absmax values per block of state; 2048 before 0.44.0 (commit aa57bd89, #1365)
BNB_MIN_8BIT_SIZE = 4096  # AdamW8bit's default min_8bit_size: smaller tensors keep float32 state
BNB_QMAP_ENTRIES = 256  # the signed and unsigned dynamic quantization maps, float32, shared by all parameters
BNB_PAGED_MIN_NUMEL = 100_000  # paged state only for tensors this large (get_state_buffer, `p.numel() < 1e5`)


def bitsandbytes_version() -> str | None:
    """The importable bitsandbytes' version, or None where it does not import (not installed, broken build)."""
    try:
        import bitsandbytes
        import bitsandbytes.optim  # noqa: F401
    except Exception:  # noqa: BLE001  a broken native library raises more than ImportError
        return None
    return str(getattr(bitsandbytes, "__version__", "unknown"))


def make_optimizer(name: str, model, params: list[torch.Tensor], *, peft_config=None, lr: float = 1e-4,
                   weight_decay: float = 0.1) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) over `params`, ready to step on meta tensors."""
    if name == "lora-fa":
        from peft.optimizers import create_lorafa_optimizer

        return create_lorafa_optimizer(model, r=peft_config.r, lora_alpha=peft_config.lora_alpha, lr=lr,
                                       weight_decay=weight_decay)
    if name == "adamw":
        # On CUDA torch picks the multi-tensor ("foreach") AdamW by default; on meta it would not, so say so.
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay, foreach=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=weight_decay)
    if name in EIGHT_BIT:
        paged = name == "paged-adamw-8bit"
        if bitsandbytes_version() is not None:
            return _bitsandbytes_on_meta(paged)(params, lr=lr, weight_decay=weight_decay)
        return Modelled8bitAdamW(params, lr=lr, weight_decay=weight_decay, paged=paged)
    raise ValueError(f"unknown optimizer {name!r}; one of {', '.join(OPTIMIZERS)}")


def _bitsandbytes_on_meta(paged: bool) -> type:
    """bitsandbytes' (Paged)AdamW8bit with the CUDA-only parts replaced; its init_state runs as shipped."""
    from bitsandbytes.optim import AdamW8bit, PagedAdamW8bit

    base = PagedAdamW8bit if paged else AdamW8bit

    class OnMeta(base):
        def get_state_buffer(self, p, dtype=torch.float32):
            if not self.is_paged:
                return super().get_state_buffer(p, dtype=dtype)
            # Paged buffers come from cudaMallocManaged through bitsandbytes' CUDA library; on meta they are
            # plain tensors of the same shape and dtype, counted on the GPU (the worst case: nothing evicted).
            return torch.zeros_like(p, dtype=dtype, device=p.device)

        def prefetch_state(self, p):
            pass  # a CUDA prefetch of paged memory: moves pages, allocates nothing

        @torch.no_grad()
        def update_step(self, group, p, gindex, pindex):
            # Stand-in for optimizer_update_8bit_blockwise / optimizer_update_32bit: the kernel updates p and
            # the state in place and allocates nothing.
            self.state[p]["step"] += 1

    OnMeta.__name__ = OnMeta.__qualname__ = base.__name__
    return OnMeta


class Modelled8bitAdamW(torch.optim.Optimizer):
    """The tensors bitsandbytes' AdamW8bit / PagedAdamW8bit allocate, in their order, for when bitsandbytes
    does not import (rule from BNB_SOURCE). Per parameter with a gradient, at its first step:
    - fewer than BNB_MIN_8BIT_SIZE elements: state1 and state2 float32, the parameter's shape;
    - otherwise: state1 and state2 uint8 of the parameter's shape, absmax1 and absmax2 float32 of
      ceil(n / BNB_BLOCKSIZE) each, and the two 256-entry float32 quantization maps, made once per device and
      shared by every parameter.
    The update itself is in place and allocates nothing; values are not computed (this runs on meta)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 paged: bool = False) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.is_paged = paged
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        state["step"] = 0
        if p.numel() < BNB_MIN_8BIT_SIZE:
            state["state1"] = torch.zeros_like(p, dtype=torch.float32)
            state["state2"] = torch.zeros_like(p, dtype=torch.float32)
            return
        if p.device not in self._qmaps:
            self._qmaps[p.device] = tuple(
                torch.zeros(BNB_QMAP_ENTRIES, dtype=torch.float32, device=p.device) for _ in range(2))
        signed, unsigned = self._qmaps[p.device]
        state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
        state["qmap1"] = signed
        state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
        state["qmap2"] = unsigned
        blocks = -(-p.numel() // BNB_BLOCKSIZE)
        state["absmax1"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)
        state["absmax2"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self._init_state(p)
                self.state[p]["step"] += 1
        return loss


def eight_bit_state_bytes(numel: int) -> int:
    """Bytes of 8-bit AdamW state for one parameter of `numel` elements (without the shared maps)."""
    if numel < BNB_MIN_8BIT_SIZE:
        return 8 * numel
    return 2 * numel + 2 * 4 * -(-numel // BNB_BLOCKSIZE)


def state_tensors(optimizer: torch.optim.Optimizer) -> dict[int, tuple[torch.Tensor, list[torch.Tensor]]]:
    """Each distinct meta storage in the optimizer's state: storage id -> (a tensor on it, the parameters whose
    state holds it; more than one for bitsandbytes' shared quantization maps)."""
    found: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for param, state in optimizer.state.items():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                key = value.untyped_storage()._cdata
                if key not in found:
                    found[key] = (value, [])
                found[key][1].append(param)
    return found


def paged_state_bytes(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, int]]:
    """(parameter, bytes) of a paged optimizer's state that bitsandbytes puts in CUDA unified memory: the state
    buffers of parameters with at least BNB_PAGED_MIN_NUMEL elements. Empty for any other optimizer."""
    if not getattr(optimizer, "is_paged", False):
        return []
    found = []
    for param, state in optimizer.state.items():
        if param.numel() >= BNB_PAGED_MIN_NUMEL:
            nbytes = sum(state[key].untyped_storage().nbytes() for key in ("state1", "state2")
                         if isinstance(state.get(key), torch.Tensor))
            found.append((param, nbytes))
    return found


def describe(name: str, state_bytes: int, paged_bytes: int = 0, bnb_version: str | None = None) -> str:
    """The assumption line naming the optimizer and its state bytes."""
    mib = f"{state_bytes:,} bytes ({state_bytes / 2**20:.1f} MiB)"
    if name == "adamw":
        what = "torch AdamW (multi-tensor), two moments in the parameters' dtype"
    elif name == "sgd":
        what = f"torch SGD (multi-tensor), momentum {SGD_MOMENTUM}: one momentum buffer in the parameters' dtype"
    elif name == "adafactor":
        what = ("transformers Adafactor (scale_parameter=False, relative_step=False, warmup_init=False, fixed lr), "
                "float32 factored second moments (rows + columns) for 2-D parameters, full for 1-D")
    elif name == "lora-fa":
        what = "PEFT's LoRA-FA optimizer"
    elif name in EIGHT_BIT:
        label = "PagedAdamW8bit" if name == "paged-adamw-8bit" else "AdamW8bit"
        source = (f"bitsandbytes {bnb_version} (its init_state run on meta; the CUDA update kernel, in place, not run)"
                  if bnb_version else f"modelled from {BNB_SOURCE} (not installed)")
        what = (f"bitsandbytes {label}, {source}: uint8 moments + float32 absmax per {BNB_BLOCKSIZE} values for "
                f"tensors of {BNB_MIN_8BIT_SIZE} elements or more, float32 moments for smaller ones")
        if name == "paged-adamw-8bit":
            what += (f"; {paged_bytes:,} bytes of it are paged (CUDA unified memory, tensors of "
                     f"{BNB_PAGED_MIN_NUMEL:,}+ elements, evictable to CPU and outside PyTorch's allocator): "
                     "counted on the GPU as the worst case")
    else:
        what = name
    return f"optimizer: {what}; optimizer state {mib}"
