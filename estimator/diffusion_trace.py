"""The traced denoiser training program (see `diffusion.py` for what it models and why)."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from peftpick.estimator.diffusion_meta import (
    BASELINE, EMPTY_CACHE, RESET_PEAK, DenoiserKernels, FastStorageTracker, MetaAnswers, apply_order, deterministic_gc, insert_markers, replay_windows, replicate,
)
from peftpick.estimator.tracer import ALLOC, FREE, Trace
from peftpick.types import Architecture, TrainingShape

TRACED_STEPS = 2  # traced; more steps are copies of the second (synthesis.repeat_last_step)
RETRACE = object()  # _Program.next_step_drops: trace the program again, the second step for real
# Optimizers whose state tensors are made at the first step and updated in place after, so a second step is the
# first without them (checked trace against trace). transformers' Adafactor replaces its "RMS" state tensor
# every step; the LoRA-FA optimizer has no denoiser candidate to check it on: their second step is traced.
STATE_MADE_ONCE = ("adamw", "sgd", "adamw-8bit", "paged-adamw-8bit")
WINDOW_STEPS = 3  # steps in each stretch between peak resets (peaks settle by the second)


@dataclass
class ProgramResult:
    peak_allocated: int
    peak_reserved: int
    breakdown: dict[str, int]
    trainable: int
    total: int
    saved_bytes: int
    peak_phase: str
    lengthened: bool = False
    windows: list = field(default_factory=list)
    between_steps: list = field(default_factory=list)


class _Bindings(dict):
    """The training loop's variables. While `first_bound` is a dict, the first binding of each name is noted
    there with the tracker's position (`StorageTracker.position`) and an ordinal: at that point of its code the
    next step rebinds the name, which drops the value this step leaves."""

    def __init__(self, where):
        super().__init__()
        self.where = where  # () -> (ordinal, tracker position)
        self.first_bound: dict[str, tuple] | None = None

    def __setitem__(self, key, value):
        if self.first_bound is not None and key not in self.first_bound:
            self.first_bound[key] = self.where()
        super().__setitem__(key, value)


# ------------------------------------------------------------------------------------------ building


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, str(name).removeprefix("torch."))


def build_denoiser(arch: Architecture, dtype: torch.dtype, **overrides):
    """The diffusers model of `arch` on the meta device, cast to `dtype` as from_pretrained(torch_dtype=...)
    does: parameters of the class's _keep_in_fp32_modules stay float32. `overrides` change config entries
    (fewer blocks, for a lengthened trace)."""
    import diffusers

    from peftpick.knowledge.architectures import skip_weight_init

    cls = getattr(diffusers, arch.denoiser.diffusers_class)
    config = {k: v for k, v in arch.config.items() if not k.startswith("_")}
    config.update(overrides)
    with torch.device("meta"), skip_weight_init():
        model = cls.from_config(config)
    keep = getattr(cls, "_keep_in_fp32_modules", None) or []
    for name, param in list(model.named_parameters()) + list(model.named_buffers()):
        if not param.is_floating_point():
            continue
        target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        if param.dtype != target:
            param.data = param.data.to(target)
    return model


_RESIDENT_CACHE: dict[tuple, torch.nn.Module] = {}


def build_resident(spec) -> torch.nn.Module:
    """A resident model (eval model, text encoder, VAE) on the meta device; built once per process (it is only
    read: its tensors are logged, never changed)."""
    key = (spec.library, spec.class_name, spec.registry_name, tuple(sorted((k, repr(v)) for k, v in spec.config.items())), spec.dtype)
    model = _RESIDENT_CACHE.get(key)
    if model is not None:
        return model
    dtype = _dtype(spec.dtype)
    from peftpick.knowledge.architectures import skip_weight_init

    if spec.library == "transformers":
        import transformers

        if spec.registry_name:
            from peftpick.knowledge.architectures import build_config, resolve_model

            config = build_config(resolve_model(spec.registry_name))
        else:
            settings = dict(spec.config)
            config = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
        cls = getattr(transformers, spec.class_name)
        with torch.device("meta"), skip_weight_init():
            model = cls._from_config(config, dtype=dtype)
        model.tie_weights()
    else:
        import diffusers

        with torch.device("meta"), skip_weight_init():
            model = getattr(diffusers, spec.class_name).from_config(dict(spec.config))
        model = model.to(dtype)
    model.eval()
    _RESIDENT_CACHE[key] = model
    return model


def _checkpoint(module, *args):
    """diffusers' default gradient-checkpointing function (non-reentrant torch.utils.checkpoint), with the
    kernel stand-ins active in the recomputation that runs inside backward."""
    return torch.utils.checkpoint.checkpoint(
        module.__call__, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), DenoiserKernels()),
    )


def _shira_rows(peft_config):
    if peft_config is not None and str(getattr(peft_config, "peft_type", "")).endswith("SHIRA"):
        rank = peft_config.r
        return lambda shape: rank * (shape[0] + shape[1])  # PEFT's SHiRA masks hold r*(m+n) ones
    return None


# Methods whose adapter construction needs real values: built on the CPU, then moved to meta. Every other method
# is built on the meta device directly (no values to fill).
_BUILD_ON_CPU: tuple[str, ...] = ()


def _permutation_matrix(self, indices):
    # peft BOFTLayer.perm2mat sets the ones of an n x n permutation matrix one element at a time (tens of
    # thousands of dispatched ops per layer, 30 s for FLUX.2-klein); this is the same matrix in one indexed write.
    n = len(indices)
    matrix = torch.zeros((n, n))
    matrix[torch.arange(n), torch.as_tensor(indices, dtype=torch.long)] = 1
    return matrix


@contextlib.contextmanager
def _fast_adapter_init(peft_type: str):
    if peft_type == "FROD":  # its decomposition and per-layer solve: estimator/frod.py
        from peftpick.estimator.frod import value_free_setup

        with value_free_setup(host_projections=False, offload_on_apply=True):
            yield
        return
    if peft_type != "BOFT":
        yield
        return
    from peft.tuners.boft.layer import BOFTLayer

    original = BOFTLayer.perm2mat
    BOFTLayer.perm2mat = _permutation_matrix
    try:
        yield
    finally:
        BOFTLayer.perm2mat = original


def wrap_adapter(build, peft_config):
    """`get_peft_model(model, config, autocast_adapter_dtype=True)` on a fresh base from `build()`."""
    from peft import get_peft_model

    peft_type = str(getattr(peft_config, "peft_type", "")).split(".")[-1]
    nonzero_rows = _shira_rows(peft_config)
    attempts = ("cpu",) if peft_type in _BUILD_ON_CPU else ("meta", "cpu")
    error = None
    for where in attempts:
        model = build()
        stack = contextlib.ExitStack()
        if where == "meta":
            stack.enter_context(torch.device("meta"))
        stack.enter_context(MetaAnswers(nonzero_rows))
        stack.enter_context(_fast_adapter_init(peft_type))
        try:
            with stack:
                wrapped = get_peft_model(model, copy.deepcopy(peft_config), autocast_adapter_dtype=True)
        except Exception as exc:  # noqa: BLE001 - retried on the CPU, re-raised below if that fails too
            error = exc
            continue
        if any(t.device.type != "meta" for t in list(wrapped.parameters()) + list(wrapped.buffers())):
            wrapped.to("meta")
        return wrapped
    raise error


# ------------------------------------------------------------------------------------------ the program


class _Program:
    def __init__(self, arch: Architecture, peft_config, shape: TrainingShape, program, exact: bool,
                 synthesize: bool = True):
        from peftpick.estimator.diffusion import geometry

        self.arch, self.d, self.shape, self.program = arch, arch.denoiser, shape, program
        self.peft_config = peft_config
        self.dtype = _dtype(shape.dtype)
        self.geo = geometry(self.d, shape)
        self.exact = exact
        self.synthesize = synthesize  # the second step made from the first where it can be (next_step_drops)
        self.second_step_made = False  # whether it was
        self.batch = shape.batch_size
        self.tracker = FastStorageTracker(vocab_size=None, nonzero_rows=_shira_rows(peft_config))
        self._ordinal = 0
        self.v = _Bindings(self.where)  # the training loop's variables
        self.zero_grad_at: tuple | None = None  # where the first step's code calls zero_grad
        self.workspace_handles: list[int] = []
        traced = TRACED_BLOCKS if peft_config is not None else TRACED_BLOCKS_TRAINED_INPUTS
        self.plan, self.overrides = block_plan(arch, exact, traced)  # [(list path, blocks in model, blocks traced)]
        self.lengthened = any(total > traced for _path, total, traced in self.plan)
        self.caches: dict[str, torch.Tensor] = {}
        self.workspaces = 0

    # -- helpers --------------------------------------------------------------------------------
    def tag_tensor(self, t, tag):
        if isinstance(t, torch.Tensor):
            self.tracker.tag(t, tag)
        return t

    def new(self, shape, dtype, tag="inputs"):
        """A tensor moved to the GPU from the CPU (one allocation)."""
        return self.tag_tensor(torch.empty(shape, dtype=dtype, device="meta"), tag)

    def workspace(self):
        if self.workspaces < 2:
            self.workspaces += 1
            self.workspace_handles.append(self.tracker.allocate(self.program.cublas_workspace, "overhead"))

    def where(self) -> tuple:
        """(ordinal, tracker position) of a point of the step's code, for `next_step_drops`."""
        self._ordinal += 1
        return self._ordinal, self.tracker.position()

    # -- model --------------------------------------------------------------------------------
    def build_model(self):
        shape = self.shape

        overrides = self.overrides

        def build():
            model = build_denoiser(self.arch, self.dtype, **overrides)
            if shape.gradient_checkpointing:
                model.enable_gradient_checkpointing(_checkpoint)
            return model

        if self.peft_config is None:
            model = build()
            model.requires_grad_(True)
        else:
            model = wrap_adapter(build, self.peft_config)
        model.train()
        # module.to(device) gives every parameter and buffer a storage of its own, the size of the tensor (a view
        # that PEFT keeps of a larger matrix, such as PSOFT's rows of an SVD factor, moves as just that view)
        model._apply(lambda t: torch.empty_like(t))
        self.model = model
        self.params = list(model.parameters())
        self.trainable = [p for p in self.params if p.requires_grad]

    def counts(self) -> tuple[int, int, int]:
        """Trainable and total parameters and the bytes save_pretrained writes, for the full depth: blocks
        left out of a lengthened trace count as their list's template block."""
        unit_of_name = self.unit_of_name
        extra = self.extra_units

        def scaled(pairs):
            out = 0
            for name, n in pairs:
                out += n * (1 + extra.get(unit_of_name(name), 0))
            return out

        named = list(self.model.named_parameters())
        total = scaled((n, p.numel()) for n, p in named)
        trainable = scaled((n, p.numel()) for n, p in named if p.requires_grad)
        if self.peft_config is None:
            state = self.model.state_dict()
        else:
            from peft import get_peft_model_state_dict

            try:
                state = get_peft_model_state_dict(self.model)
            except Exception:  # noqa: BLE001 - what is saved is then the trainable parameters
                state = {n: p for n, p in named if p.requires_grad}
        seen, pairs = set(), []
        for name, t in state.items():
            key = t.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                pairs.append((name, t.numel() * t.element_size()))
        return trainable, total, scaled(pairs)

    # -- phases ----------------------------------------------------------------------------------
    def setup(self):
        tr, program = self.tracker, self.program
        tr.set_phase("build")
        if program.baseline:  # init_accelerator(): nn.Linear(1, 1).to(device), then the reserved bytes are read
            w, b = torch.empty(1, 1, device="meta"), torch.empty(1, device="meta")
            del w, b
            tr.mark(BASELINE)
        if program.index_rows:
            # train_indices = torch.cat([torch.randperm(n, device=cuda) for _ in range(repeats)])
            n = max(program.cached_latents, 1)
            pieces = [torch.empty(n, dtype=torch.long, device="meta") for _ in range(program.index_rows // n)]
            self.caches["indices"] = self.tag_tensor(torch.cat(pieces), "inputs")
            del pieces
        for spec in program.resident:
            for t in apply_order(build_resident(spec)):
                tr.adopt(t)
                tr.tag(t, "other models")
        if not self.shape.cached_inputs:
            # text encoders and VAE kept on the GPU for the whole run: modelled from their parameter counts
            for _name, params in self.d.text_encoders:
                tr.allocate(params * self.dtype.itemsize, "other models")
            if self.d.vae_params:
                tr.allocate(self.d.vae_params * self.dtype.itemsize, "other models")
        full = self.peft_config is None
        for t in apply_order(self.model):
            tr.adopt(t)
            if isinstance(t, torch.nn.Parameter) and t.requires_grad and not full:
                tr.tag(t, "adapter")
            else:
                tr.tag(t, "weights")
        self.attribute_blocks()
        tr.propagate_owner = True  # outside the blocks, an output belongs to its input's block (optimizer state)

    def attribute_blocks(self):
        """Number the blocks of every list in execution order (units), mark which unit owns each parameter and
        buffer, and make the tracker follow which unit's code runs (as training._attribute_layers does for a
        decoder's layers): forward pre-hooks enter a unit, forward hooks leave it; in backward, the gradient of
        a unit's output marks the start of its backward and the gradient of the first unit's input the end."""
        tr = self.tracker
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.unit_prefixes: list[tuple[str, int]] = []
        self.extra_units: dict[int, int] = {}
        self.lists: list[tuple[int, int, int]] = []  # (first unit, traced, total)
        unit = 0
        prefix_of = {id(m): n for n, m in self.model.named_modules()}
        for path, total, _traced in self.plan:
            blocks = base.get_submodule(path)
            self.lists.append((unit, len(blocks), total))
            if total > len(blocks):
                self.extra_units[unit + 1] = total - len(blocks)
            for index, block in enumerate(blocks):
                self.unit_prefixes.append((prefix_of[id(block)] + ".", unit))
                for t in list(block.parameters()) + list(block.buffers()):
                    tr.set_owner(t, unit)

                def enter(_module, args, kwargs, unit=unit, first=unit == 0):
                    tr.push_context(unit)
                    if first:
                        hidden = args[0] if args else kwargs.get("hidden_states")
                        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                            hidden.register_hook(lambda _grad: tr.set_context(None))

                def leave(_module, _args, output, unit=unit):
                    tr.pop_context()
                    # the first output that backward reaches (SD3's last block returns no text stream first)
                    outputs = output if isinstance(output, (tuple, list)) else (output,)
                    hidden = next((o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad), None)
                    if hidden is not None:
                        hidden.register_hook(lambda _grad: tr.set_context(unit))

                block.register_forward_pre_hook(enter, with_kwargs=True)
                block.register_forward_hook(leave)
                unit += 1

    def shares_across_blocks(self) -> bool:
        """Whether several blocks train one tensor. Frozen shared tensors (VeRA's and RandLoRA's random bases)
        are made once, outside the blocks' steps, and lengthen like the weights (the same peaks as a trace of
        every block); a trained one gets gradients and optimizer state that no single block's copy holds."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        seen: dict[int, int] = {}
        index = 0
        for path, _total, _traced in self.plan:
            for block in base.get_submodule(path):
                for t in block.parameters():
                    if t.requires_grad and seen.setdefault(id(t), index) != index:
                        return True
                index += 1
        return False

    def unit_of_name(self, name: str) -> int | None:
        for prefix, unit in self.unit_prefixes:
            if name.startswith(prefix) or ("." + prefix) in ("." + name):
                return unit
        return None

    def lengthen(self, trace: Trace) -> Trace:
        """Repeat each list's template block (its second) to the list's real length, last list first so the
        earlier lists' unit numbers hold."""
        from peftpick.estimator.synthesis import lengthen

        units = sum(traced for _first, traced, _total in self.lists)
        for first, traced, total in reversed(self.lists):
            if total > traced:
                trace = lengthen(trace, units, units + total - traced, first + 1)
                units += total - traced
                # synthesis.lengthen returns no owners; in its output an allocation's unit is its storage's owner
                trace.owner = {h: u for k, h, _b, u in trace.events if k == ALLOC and u is not None}
        return trace

    def precompute(self):
        """run.py precompute_prompt_caches + precompute_latent_cache (b2d61f5), traced."""
        p = self.program.precompute
        tr = self.tracker
        tr.set_phase("precompute")
        text_len = self.d.text_len
        # --- prompts
        te = build_resident(p.text_encoder)
        te_tensors = apply_order(te)
        for t in te_tensors:
            tr.adopt(t)
        self.workspace()  # the process's first matmul is the text encoder's: the forward thread's cuBLAS workspace
        start = len(tr.trace.events)
        with torch.no_grad(), DenoiserKernels():
            input_ids = torch.empty(1, text_len, dtype=torch.long, device="meta")
            attention_mask = torch.empty(1, text_len, dtype=torch.long, device="meta")
            out = te(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
            x = torch.stack([out.hidden_states[k] for k in p.text_layers], dim=1)
            x = x.to(dtype=self.dtype)
            b, c, s, h = x.shape
            embeds = x.permute(0, 2, 1, 3).reshape(b, s, c * h)
            del out, x, input_ids, attention_mask
            embeds = embeds.repeat(1, 1, 1).view(b, s, -1)  # encode_prompt's num_images_per_prompt repeat
            text_ids = torch.empty(1, s, 4, dtype=torch.long, device="meta")  # made on the CPU, moved
        end = len(tr.trace.events)
        survivors = replicate(tr.trace, start, end, p.prompts - 1, tr.new_handle)
        for t in te_tensors:  # offload_models: back to the CPU
            tr.free(t)
        prompt_cache = torch.cat([embeds] * p.prompts, dim=0)
        text_ids_cache = torch.cat([text_ids] * p.prompts, dim=0)
        del embeds, text_ids
        self.free_handles(survivors)
        self.caches["prompt_embeds"] = self.tag_tensor(prompt_cache, "inputs")
        self.caches["text_ids"] = self.tag_tensor(text_ids_cache, "inputs")
        # --- latents
        vae = build_resident(p.vae)
        vae_tensors = apply_order(vae)
        bn = getattr(vae, "bn", None)
        for t in vae_tensors:
            tr.adopt(t)
        res = self.geo["resolution"]
        with torch.no_grad(), DenoiserKernels():
            if bn is not None:
                bn_mean = torch.empty(1, bn.num_features, 1, 1, dtype=bn.running_mean.dtype, device="meta")
                bn_std = torch.empty(1, bn.num_features, 1, 1, dtype=bn.running_var.dtype, device="meta")
            start = len(tr.trace.events)
            pixels = torch.empty(p.batch_size, 3, res, res, dtype=self.dtype, device="meta")
            latents = vae.encode(pixels).latent_dist.mode()
            del pixels
            latents = _patchify(latents)
            if bn is not None:
                latents = (latents - bn_mean) / bn_std
            end = len(tr.trace.events)
            batches = -(-p.images // p.batch_size)
            survivors = replicate(tr.trace, start, end, batches - 1, tr.new_handle)
        for t in vae_tensors:
            tr.free(t)
        latent_cache = torch.cat([latents] * batches, dim=0)[: p.images]
        if latent_cache.shape[0] != batches * latents.shape[0]:
            latent_cache = latent_cache.clone()
        del latents
        if bn is not None:
            del bn_mean, bn_std
        self.free_handles(survivors)
        self.caches["latents"] = self.tag_tensor(latent_cache, "inputs")

    def free_handles(self, groups):
        for group in groups:
            for handle in group:
                self.tracker.trace.events.append((FREE, handle, 0, None))

    def plain_caches(self):
        """Caches without a traced precompute: tensors of their size moved to the GPU."""
        program, d, geo = self.program, self.d, self.geo
        if program.cached_prompts:
            self.caches["prompt_embeds"] = self.new((program.cached_prompts, d.text_len, d.text_dim), self.dtype)
            if d.family == "flux2":
                self.caches["text_ids"] = self.new((program.cached_prompts, d.text_len, 4), torch.long)
        if program.cached_latents:
            self.caches["latents"] = self.new((program.cached_latents, *self.latent_shape()), self.dtype)

    def latent_shape(self) -> tuple[int, ...]:
        d, geo = self.d, self.geo
        if d.family == "flux2":  # the suite caches patchified latents (C x 4, H / 2, W / 2)
            return (d.latent_channels * d.patch * d.patch, geo["height"] // d.patch, geo["width"] // d.patch)
        if d.vae_temporal:
            return (d.latent_channels, geo["frames"], geo["height"], geo["width"])
        return (d.latent_channels, geo["height"], geo["width"])

    # -- one training step ------------------------------------------------------------------------
    def step(self, index: int, optimizer, global_step: int):
        tr, v, d, B = self.tracker, self.v, self.d, self.batch
        tr.set_phase(f"forward{index}")
        if "latents" in self.caches:
            indices = self.caches.get("indices")
            rows = self.caches["latents"].shape[0]
            batch_indices = (indices[:B] if indices is not None else self.new((B,), torch.long))
            v["latents"] = self.tag_tensor(self.caches["latents"].index_select(0, batch_indices), "inputs")
            if "prompt_embeds" in self.caches:
                v["prompt_embeds"] = self.tag_tensor(self.caches["prompt_embeds"].index_select(0, batch_indices), "inputs")
            if "text_ids" in self.caches:
                v["text_ids"] = self.tag_tensor(self.caches["text_ids"].index_select(0, batch_indices), "inputs")
            del batch_indices, rows
        else:
            v["latents"] = self.new((B, *self.latent_shape()), self.dtype)
        if "prompt_embeds" not in self.caches:
            v["prompt_embeds"] = self.new((B, d.text_len, d.text_dim), self.dtype)
        if d.pooled_dim:
            v["pooled"] = self.new((B, d.pooled_dim), self.dtype)
        family = _FAMILIES[d.family]
        family.ids(self, v)
        v["noise"] = self.tag_tensor(torch.randn_like(v["latents"]), "inputs")
        noise_shape = (B,) + (1,) * (v["latents"].dim() - 1)
        if d.objective == "flow":
            v["timesteps"] = self.new((B,), torch.float32)
            v["sigmas"] = self.new(noise_shape, self.dtype)
            v["noisy"] = (1.0 - v["sigmas"]) * v["latents"] + v["sigmas"] * v["noise"]
        else:
            v["timesteps"] = self.new((B,), torch.long)
            # DDPMScheduler.add_noise: alphas_cumprod moved to the device in the samples' dtype, gathered, broadcast
            alphas = self.new((1000,), self.dtype)
            sqrt_alpha = (alphas[v["timesteps"]] ** 0.5).flatten().reshape(noise_shape)
            sqrt_one_minus = ((1 - alphas[v["timesteps"]]) ** 0.5).flatten().reshape(noise_shape)
            v["noisy"] = sqrt_alpha * v["latents"] + sqrt_one_minus * v["noise"]
            v["sqrt_alpha"], v["sqrt_one_minus"] = sqrt_alpha, sqrt_one_minus
            del alphas, sqrt_alpha, sqrt_one_minus
        if self.v.first_bound is not None:
            self.zero_grad_at = self.where()
        optimizer.zero_grad(set_to_none=True)
        if index == 0 and self.workspaces == 0:
            self.workspace()
        with DenoiserKernels():
            v["model_pred"] = family.forward(self, v)
        v["weighting"] = torch.ones_like(v["sigmas"]) if "sigmas" in v else None
        if d.objective == "flow":
            v["target"] = v["noise"] - v["latents"]
        elif d.objective == "epsilon":
            v["target"] = v["noise"]
        else:
            v["target"] = v["sqrt_alpha"] * v["noise"] - v["sqrt_one_minus"] * v["latents"]
        squared = (v["model_pred"].float() - v["target"].float()) ** 2
        if v["weighting"] is not None:
            squared = v["weighting"].float() * squared
        v["loss"] = torch.mean(squared.reshape(B, -1), 1)
        del squared
        v["loss"] = v["loss"].mean()
        tr.set_phase(f"backward{index}")
        if self.workspaces < 2:
            self.workspace()  # the autograd thread's first matmul
        v["loss"].backward()
        tr.set_context(None)
        for p in self.trainable:
            if p.grad is not None:
                tr.tag(p.grad, "grads")
        tr.set_phase(f"optimizer{index}")
        if self.program.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.program.grad_clip)
        optimizer.step()
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.device.type == "meta":
                    tr.tag(value, "optimizer")
        if self.peft_config is not None and str(self.peft_config.peft_type).endswith("ADALORA"):
            self.model.base_model.update_and_allocate(global_step)

    def optimizer(self):
        # the same optimizers, built the same way, as the causal-LM trace (estimator.optimizers); frozen
        # parameters have no gradient and are not passed
        from peftpick.estimator.optimizers import make_optimizer

        return make_optimizer(self.shape.optimizer, self.model, self.params, peft_config=self.peft_config,
                              lr=self.program.learning_rate, weight_decay=self.program.weight_decay)

    # -- run ---------------------------------------------------------------------------------------
    def repeat_steps(self, trace: Trace, traced: int) -> tuple[Trace, bool]:
        """`trace` with copies of its last step up to the steps replayed (two windows of WINDOW_STEPS with
        evaluations, else 5), and whether the copies could be made (synthesis.repeat_last_step)."""
        from peftpick.estimator.synthesis import repeat_last_step

        evaluations = self.program.evaluations
        total_steps = 2 * WINDOW_STEPS if evaluations else 5
        if traced >= total_steps:
            return trace, True

        def between_windows(longer: Trace, steps: int) -> None:
            if evaluations and steps == WINDOW_STEPS:
                insert_markers(longer, len(longer.events), (EMPTY_CACHE, RESET_PEAK))

        longer = repeat_last_step(trace, traced, total_steps - traced, between_windows)
        return (trace, False) if longer is None else (longer, True)

    def trace_steps(self) -> tuple[Trace | None, int]:
        """The traced program up to the end of its traced steps (the second made from the first where it can
        be: next_step_drops), and how many steps that is; None for the trace where it must be traced again."""
        program, tr = self.program, self.tracker
        with tr:
            self.setup()
            optimizer = self.optimizer()
            if program.precompute is not None:
                self.precompute()
            else:
                self.plain_caches()
            if program.evaluations:
                tr.mark(EMPTY_CACHE)
                tr.mark(RESET_PEAK)
            steps = _traced_steps(self.peft_config, program)
            drops = None
            for index, global_step in enumerate(steps):
                if index == 1 and self.v.first_bound is not None:
                    self.v.first_bound, first_bound = None, self.v.first_bound
                    drops = self.next_step_drops(optimizer, first_bound)
                    if drops is not None:
                        break
                if program.evaluations and index == WINDOW_STEPS and index < len(steps):
                    tr.mark(EMPTY_CACHE)
                    tr.mark(RESET_PEAK)
                if (index == 0 and self.synthesize and len(steps) == TRACED_STEPS
                        and self.shape.optimizer in STATE_MADE_ONCE):
                    self.v.first_bound = {}
                self.step(index, optimizer, global_step)
            tr.set_phase("end")
            self.v.clear()
        if drops is RETRACE:
            return None, len(steps)
        if drops is None:
            return tr.trace, len(steps)
        from peftpick.estimator.synthesis import second_step_from_first

        once, frees = drops
        self.second_step_made = True
        return second_step_from_first(tr.trace, 1, once, frees), len(steps)

    def next_step_drops(self, optimizer, first_bound: dict[str, tuple]):
        """What the first traced step leaves, sorted by what the second does with it, for
        synthesis.second_step_from_first: (the storages it never makes again: optimizer state and library
        workspaces, [the frees it makes of the rest: at zero_grad, and where the loop variables are first
        rebound]).

        What a drop frees is not assumed: zero_grad is called and the variables are deleted, in the order the
        second step reaches those points, and the frees the tracker sees are taken. None, with the program
        untouched, where the first step leaves a storage besides its variables, gradients and lasting state
        (a cache the model keeps): then the second step is traced. RETRACE where a drop allocates, or leaves a
        storage of the first step alive: the program, its state changed, is traced again without synthesis."""
        import gc

        gc.collect()  # what the next phase change collects (FastStorageTracker.set_phase) before step 1 starts
        tr = self.tracker
        trace = tr.trace
        events = trace.events
        made = {h for k, h, _b, _u in events[trace.marks["forward0"]:] if k == ALLOC}
        live = tr.live_handles() & made
        once = {h for h in self.workspace_handles if h in made}
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and tr.handle_of(value) in made:
                    once.add(tr.handle_of(value))
        held = {tr.handle_of(p.grad) for p in self.params if p.grad is not None}
        held |= {tr.handle_of(value) for value in self.v.values() if isinstance(value, torch.Tensor)}
        if live - once - held or self.zero_grad_at is None:
            return None
        points = sorted([(self.zero_grad_at, None)] + [(first_bound[key], key) for key in self.v],
                        key=lambda point: point[0][0])
        owner = trace.owner
        frees, freed = [], set()
        for (_ordinal, position), key in points:
            start = len(events)
            if key is None:
                optimizer.zero_grad(set_to_none=True)
            else:
                dict.__delitem__(self.v, key)
            seen = events[start:]
            del events[start:]
            if any(kind != FREE for kind, _h, _b, _u in seen):
                return RETRACE
            handles = [h for _k, h, _b, _u in seen]
            freed.update(handles)
            if handles:
                frees.append((position[0], position[1], [(h, tr.unit_of_free_at(position, owner.get(h))) for h in handles]))
        start = len(events)
        gc.collect()  # a drop that leaves garbage in reference cycles: freed at a phase change, not at the drop
        if len(events) > start or live - once - freed:
            return RETRACE
        return once, frees

    def prepare(self) -> None:
        """Build the model, and what the program builds before it runs (not part of the trace)."""
        self.build_model()
        if self.lengthened and self.shares_across_blocks():
            # an adapter with tensors shared by several blocks (VB-LoRA's vector bank, Lily's shared projections)
            # does not repeat block by block: trace every block
            self.plan, self.overrides = block_plan(self.arch, True)
            self.lengthened = False
            self.build_model()
        program = self.program
        for spec in program.resident:  # built before tracing (their construction is not part of the run)
            build_resident(spec)
        if program.precompute is not None:
            build_resident(program.precompute.text_encoder)
            build_resident(program.precompute.vae)
        # the built model's objects leave the collector's reach once its garbage is gone: the collection at each
        # phase change then scans only what the trace makes (deterministic_gc unfreezes them after)
        import gc

        gc.collect()
        gc.freeze()

    def run(self) -> ProgramResult:
        from peftpick.estimator.diffusion import PARTS

        self.prepare()
        traced_trace, traced = self.trace_steps()
        if traced_trace is None:
            return _Program(self.arch, self.peft_config, self.shape, self.program, self.exact, synthesize=False).run()
        trace = traced_trace
        if self.lengthened:
            # lengthened first, the steps are copied cheaply (lengthening costs per event, and there are fewer);
            # where the lengthened steps do not match storage by storage, they are copied as traced
            trace, complete = self.repeat_steps(self.lengthen(trace), traced)
            if not complete:
                trace = self.lengthen(self.repeat_steps(traced_trace, traced)[0])
        else:
            trace = self.repeat_steps(trace, traced)[0]
        result = replay_windows(trace, PARTS)
        trainable, total, saved = self.counts()
        return ProgramResult(result.peak_allocated, result.peak_reserved, result.breakdown, trainable, total, saved,
                             result.peak_phase, self.lengthened, result.windows, result.between_steps)


# Lists of identical blocks per family: (module path, blocks in the real model). Lists longer than TRACED_BLOCKS
# are built with TRACED_BLOCKS blocks and lengthened (the template, block 1 of the list, sits between two
# ordinary blocks). Each family says which config entries build the shorter lists. SD3.5 Medium's blocks
# are not uniform (dual-attention blocks first): it is traced whole.
TRACED_BLOCKS = 3
# With the embedders trained (full fine-tuning), every block's side inputs (timestep and text embeddings) need
# gradients, summed block by block from the last block back; the last block starts that sum and allocates
# differently, so the template's successor must be an ordinary block: one more is traced. (With three, a Wan
# 2.1 1.3B full fine-tuning step left the copies' partial sums alive: 50.3 GiB estimated instead of 25.7.)
TRACED_BLOCKS_TRAINED_INPUTS = 4


def _length(config: dict, key: str) -> int:
    return int(config.get(key, 0) or 0)


def _lists_by_key(*pairs: tuple[str, str]):
    """Block lists whose lengths are config entries ((module path, config key) pairs): the lists of a config,
    and the overrides that build each with `traced` blocks."""
    def lists(config):
        return [(path, _length(config, key)) for path, key in pairs]

    def shrunk(config, traced):
        return {key: min(_length(config, key), traced) for _path, key in pairs}

    return lists, shrunk


def _unet_lists(config: dict) -> list[tuple[str, int]]:
    """diffusers UNet2DConditionModel: every cross-attention down block has `layers_per_block` attentions of
    transformer_layers_per_block[i] blocks, the mid block one of the last entry's, every up block one more
    attention than a down block, with the list reversed (unless reverse_transformer_layers_per_block is set)."""
    down_types, up_types = config.get("down_block_types", ()), config.get("up_block_types", ())
    per_block = config.get("transformer_layers_per_block", 1)
    per_block = [per_block] * len(down_types) if isinstance(per_block, int) else list(per_block)
    reverse = config.get("reverse_transformer_layers_per_block") or list(reversed(per_block))
    layers = int(config.get("layers_per_block", 2))
    lists = []
    for i, kind in enumerate(down_types):
        if "CrossAttn" in kind:
            lists += [(f"down_blocks.{i}.attentions.{j}.transformer_blocks", int(per_block[i])) for j in range(layers)]
    if "CrossAttn" in str(config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        lists.append(("mid_block.attentions.0.transformer_blocks", int(per_block[-1])))
    for i, kind in enumerate(up_types):
        if "CrossAttn" in kind:
            count = reverse[i]
            if not isinstance(count, int):  # a tuple per attention (no SDXL-like model uses this)
                return []
            lists += [(f"up_blocks.{i}.attentions.{j}.transformer_blocks", int(count)) for j in range(layers + 1)]
    return lists


def _shrunk_unet(config: dict, traced: int) -> dict:
    per_block = config.get("transformer_layers_per_block", 1)
    per_block = [per_block] * len(config.get("down_block_types", ())) if isinstance(per_block, int) else per_block
    return {"transformer_layers_per_block": [min(int(n), traced) for n in per_block]}


def _sd3_uniform(config: dict) -> list[tuple[str, int]]:
    # SD3.5 Large: every block alike but the last (context_pre_only), which stays the last traced block
    if config.get("dual_attention_layers"):
        return []
    return [("transformer_blocks", _length(config, "num_layers"))]


_FLUX_LISTS = _lists_by_key(("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers"))
# family -> (its block lists from the config, the config entries that build every list with `traced` blocks)
_BLOCK_LISTS = {
    "flux2": _FLUX_LISTS,
    "flux": _FLUX_LISTS,
    "wan": _lists_by_key(("blocks", "num_layers")),
    "qwen-image": _lists_by_key(("transformer_blocks", "num_layers")),
    "sd3": (_sd3_uniform, _lists_by_key(("transformer_blocks", "num_layers"))[1]),
    "sdxl": (_unet_lists, _shrunk_unet),
}


def block_plan(arch: Architecture, exact: bool, traced: int = TRACED_BLOCKS) -> tuple[list[tuple[str, int, int]], dict]:
    """[(module path of a block list, blocks in the model, blocks traced)] in execution order, and the config
    overrides that build the traced model (none when every block is traced). Lists longer than `traced` blocks
    are traced with `traced`."""
    lists_of, shrunk_of = _BLOCK_LISTS.get(arch.denoiser.family, (lambda _c: [], lambda _c, _t: {}))
    config = arch.config
    lists = [(path, total) for path, total in lists_of(config) if total > 0]
    lengthen = not exact and any(total > traced for _path, total in lists)
    plan = [(path, total, min(total, traced) if lengthen else total) for path, total in lists]
    return plan, (shrunk_of(config, traced) if lengthen else {})


def _traced_steps(peft_config, program) -> list[int]:
    """Global step numbers traced for real: two, or for AdaLoRA (whose budget step changes what a step
    allocates) both windows' steps."""
    if peft_config is not None and str(peft_config.peft_type).endswith("ADALORA"):
        tinit = peft_config.tinit
        return [1, 2, 3, tinit + 1, tinit + 2, tinit + 3]
    return list(range(1, TRACED_STEPS + 1))


def _patchify(latents):
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(b, c * 4, h // 2, w // 2)


# ------------------------------------------------------------------------------------------ families


class _Flux2:
    @staticmethod
    def ids(prog, v):
        B, geo, d = prog.batch, prog.geo, prog.d
        h, w = geo["height"] // d.patch, geo["width"] // d.patch
        if "text_ids" not in prog.caches:
            v["text_ids"] = prog.new((B, d.text_len, 4), torch.long)
        # _prepare_latent_ids: made on the CPU (expanded), moved: a contiguous copy
        v["img_ids"] = prog.new((B, h * w, 4), torch.long)

    @staticmethod
    def forward(prog, v):
        B, model = prog.batch, prog.model
        noisy = v["noisy"]
        b, c, h, w = noisy.shape
        packed = noisy.reshape(b, c, h * w).permute(0, 2, 1)
        guidance = None
        if _config(model).get("guidance_embeds"):
            guidance = torch.full([1], prog.program.guidance_scale, device="meta").expand(B)
        pred = model(hidden_states=packed, timestep=v["timesteps"] / 1000, guidance=guidance,
                     encoder_hidden_states=v["prompt_embeds"], txt_ids=v["text_ids"], img_ids=v["img_ids"],
                     return_dict=False)[0]
        pred = pred[:, : h * w]
        return _unpack_with_ids(pred, v["img_ids"], h, w)


def _unpack_with_ids(x, ids, h, w):
    """Flux2 pipeline _unpack_latents_with_ids (scatter of tokens into place), with the height and width the
    suite lets it find with torch.max (two scalars per sample)."""
    out_list = []
    for data, pos in zip(x, ids):
        ch = data.shape[1]
        h_ids, w_ids = pos[:, 1], pos[:, 2]
        torch.max(h_ids) + 1, torch.max(w_ids) + 1  # noqa: B018 - the scalars the real code computes
        flat = h_ids * w + w_ids
        out = torch.zeros((h * w, ch), device=data.device, dtype=data.dtype)
        out.scatter_(0, flat.unsqueeze(1).expand(-1, ch), data)
        out_list.append(out.view(h, w, ch).permute(2, 0, 1))
    return torch.stack(out_list, dim=0)


class _Flux:
    @staticmethod
    def ids(prog, v):
        d, geo = prog.d, prog.geo
        n = (geo["height"] // 2) * (geo["width"] // 2)
        v["img_ids"] = prog.new((n, 3), prog.dtype)
        v["text_ids"] = prog.new((d.text_len, 3), prog.dtype)

    @staticmethod
    def forward(prog, v):
        B, model = prog.batch, prog.model
        noisy = v["noisy"]
        b, c, h, w = noisy.shape
        packed = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        guidance = None
        if _config(model).get("guidance_embeds"):
            guidance = torch.full([B], prog.program.guidance_scale, device="meta")
        pred = model(hidden_states=packed, timestep=v["timesteps"] / 1000, guidance=guidance,
                     pooled_projections=v["pooled"], encoder_hidden_states=v["prompt_embeds"],
                     txt_ids=v["text_ids"], img_ids=v["img_ids"], return_dict=False)[0]
        return pred.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class _SD3:
    @staticmethod
    def ids(prog, v):
        pass

    @staticmethod
    def forward(prog, v):
        return prog.model(hidden_states=v["noisy"], timestep=v["timesteps"], encoder_hidden_states=v["prompt_embeds"],
                          pooled_projections=v["pooled"], return_dict=False)[0]


class _SDXL:
    @staticmethod
    def ids(prog, v):
        v["time_ids"] = prog.new((prog.batch, prog.d.added_time_ids or 6), prog.dtype)

    @staticmethod
    def forward(prog, v):
        cond = {"text_embeds": v["pooled"], "time_ids": v["time_ids"]}
        return prog.model(v["noisy"], v["timesteps"], v["prompt_embeds"], added_cond_kwargs=cond, return_dict=False)[0]


class _Wan:
    @staticmethod
    def ids(prog, v):
        pass

    @staticmethod
    def forward(prog, v):
        return prog.model(hidden_states=v["noisy"], timestep=v["timesteps"], encoder_hidden_states=v["prompt_embeds"],
                          return_dict=False)[0]


class _QwenImage:
    @staticmethod
    def ids(prog, v):
        v["text_mask"] = prog.new((prog.batch, prog.d.text_len), torch.long)

    @staticmethod
    def forward(prog, v):
        B, model = prog.batch, prog.model
        noisy = v["noisy"]
        b, c, h, w = noisy.shape
        packed = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        pred = model(hidden_states=packed, timestep=v["timesteps"] / 1000, guidance=None,
                     encoder_hidden_states_mask=v["text_mask"], encoder_hidden_states=v["prompt_embeds"],
                     img_shapes=[[(1, h // 2, w // 2)]] * B, return_dict=False)[0]
        return pred.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


_FAMILIES = {"flux2": _Flux2, "flux": _Flux, "sd3": _SD3, "sdxl": _SDXL, "wan": _Wan, "qwen-image": _QwenImage}


def _config(model) -> dict:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return dict(getattr(base, "config", {}) or {})


@contextlib.contextmanager
def run_code_of(version: str | None):
    """The diffusers code a run used, where it allocates differently from the installed release. Known:
    before 0.39.0 Flux2SwiGLU split its input with `x.chunk(2, dim=-1)` (backward: one SplitBackward concatenating
    both halves' gradients); from 0.39.0 it slices `x[..., :half]`, `x[..., half:]` (backward: each SliceBackward
    makes a zero-filled full-width gradient, and the two are summed): two more (tokens x 2 x mlp_hidden) buffers
    in every FLUX.2 block's backward."""
    patched = []
    if version is not None and _version_tuple(version) < (0, 39):
        from diffusers.models.transformers import transformer_flux2

        cls = transformer_flux2.Flux2SwiGLU

        def chunk_forward(self, x):
            x1, x2 = x.chunk(2, dim=-1)
            return self.gate_fn(x1) * x2

        patched.append((cls, cls.forward))
        cls.forward = chunk_forward
    try:
        yield
    finally:
        for cls, forward in patched:
            cls.forward = forward


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def trace_program(arch: Architecture, peft_config, shape: TrainingShape, program, exact: bool = False) -> ProgramResult:
    with run_code_of(program.diffusers_version), deterministic_gc():
        return _Program(arch, peft_config, shape, program, exact).run()
