"""Turning an adapter a serving stack cannot load into a plain LoRA adapter it can, with PEFT's own tools.

Three routes, chosen from the adapter's config:

- **initial-model conversion** (PiSSA, OLoRA, CorDA: inits that rewrite the base weights): PEFT's
  `save_pretrained(..., path_initial_model_for_weight_conversion=...)` writes the trained update as a LoRA of
  rank 2r on the *original* base. It needs the adapter as initialised before training; peftpick recomputes it
  from the base weights where the init is deterministic (PiSSA's full SVD, OLoRA's QR), or takes
  `initial_adapter`. Exact up to rounding.
- **rescale**: each module's own scale (rsLoRA's alpha/sqrt(r), rank_pattern / alpha_pattern) baked into lora_B,
  every module at the largest rank with r = lora_alpha, so that a stack applying one alpha / r serves the same
  update. Exact (up to the tensors' rounding); needs no base weights.
- **SVD** of each layer's weight update (LoHa, LoKr, OFT, IA3, a LoRA of too high a rank ...): PEFT's
  `convert_to_lora` with a fixed rank or an energy threshold. Approximate.

Every route measures what it produced: for each layer, the relative Frobenius error ||dW - dW'|| / ||dW|| of the
converted update dW' against the adapter's true update dW (the merged weight minus the base weight, where PEFT
can merge the method), and the same over all layers together.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftpick.adapters.files import CONFIG_NAME, SAFETENSORS_NAME, SavedAdapter, read_adapter
from peftpick.errors import PeftpickError
from peftpick.knowledge.serving import rewriting_init

# Inits (of those that rewrite the base weights) whose initial adapter can be recomputed from the base weights
# alone: PiSSA's full SVD and OLoRA's QR are deterministic; pissa_niter_K (randomised) and CorDA (data) are not.
_REPRODUCIBLE_INITS = ("pissa", "olora")
# An update whose PEFT delta (get_delta_weight) is further than this from merge-minus-base is not what PEFT's
# convert_to_lora sees, so its conversion would drop part of it (DoRA's magnitude, for one).
_DELTA_MISMATCH = 1e-3

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LayerConversion:
    module: str
    rank: int
    relative_error: float  # ||dW - dW'||_F / ||dW||_F
    update_norm: float  # ||dW||_F


@dataclass(frozen=True)
class Conversion:
    """What `convert_adapter` wrote and how close it is to the original update."""

    source: Path
    output: Path
    from_method: str
    route: str  # "initial-model", "rescale", "svd", "initial-model + svd"
    exact: bool
    rank: int  # the largest rank of the written adapter
    layers: tuple[LayerConversion, ...]
    notes: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def overall_error(self) -> float:
        """||dW - dW'|| / ||dW|| over every layer together (a layer weighs by the size of its update)."""
        total = sum(layer.update_norm ** 2 for layer in self.layers)
        if total == 0:
            return 0.0
        return math.sqrt(sum((layer.relative_error * layer.update_norm) ** 2 for layer in self.layers) / total)

    @property
    def worst_layer(self) -> LayerConversion | None:
        return max(self.layers, key=lambda layer: layer.relative_error, default=None)


def method_label(config: Mapping[str, Any]) -> str:
    """A person's name for the method an adapter config describes ("PiSSA", "rsLoRA", "LoHa" ...)."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "LORA":
        init = config.get("init_lora_weights")
        if isinstance(init, str):
            low = init.lower()
            for prefix, name in (("pissa", "PiSSA"), ("olora", "OLoRA"), ("corda", "CorDA"), ("loftq", "LoftQ"),
                                 ("eva", "EVA"), ("lora_ga", "LoRA-GA"), ("mica", "MiCA")):
                if low.startswith(prefix):
                    return name
        if config.get("use_dora"):
            return "DoRA"
        if config.get("use_rslora"):
            return "rsLoRA"
        return "LoRA"
    from peftpick.methods import METHODS

    for spec in METHODS:
        if spec.peft_type == peft_type:
            return spec.display_name
    return peft_type.replace("_", " ").title() if peft_type else "unknown"


def convert_adapter(
    path: Path | str,
    output: Path | str,
    *,
    rank: int | None = None,
    energy: float | None = None,
    base: str | None = None,
    initial_adapter: Path | str | None = None,
    dtype: str | None = None,
    progress: Progress | None = None,
    kb: Any = None,
) -> Conversion:
    """Convert the adapter at `path` into a plain LoRA adapter at `output` (see the module docstring).

    rank / energy: the SVD route's fixed rank, or the share of each layer's squared singular values to keep
    (0 < energy <= 1); the exact routes take neither unless the result should be compressed further.
    base: the base model (folder, hub id in the cache, registry name); needed by every route but the rescale.
    """
    say = progress or (lambda _message: None)
    if rank is not None and energy is not None:
        raise PeftpickError("give --rank or --energy, not both", "e.g. --rank 32, or --energy 0.99")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise PeftpickError(f"--rank must be a whole number of at least 1, got {rank!r}", "e.g. --rank 32")
    if energy is not None and not (isinstance(energy, float) and 0 < energy <= 1):
        raise PeftpickError(f"--energy must be a share above 0 and at most 1, got {energy!r}", "e.g. --energy 0.99")
    adapter = read_adapter(path)
    out = _prepare_output(Path(output), adapter.path)
    config = adapter.config
    label = method_label(config)
    peft_type = adapter.peft_type
    family = rewriting_init(config) if peft_type == "LORA" else None
    init = str(config.get("init_lora_weights")) if family is not None else None

    if init is not None:
        if family == "loftq":
            raise PeftpickError(
                f"{label} adapters cannot be converted to LoRA on the original base: LoftQ replaces the base "
                "weights with a quantized residual, and PEFT's initial-model conversion does not cover it",
                "serve the LoftQ base that PEFT saved with the adapter (set init_lora_weights to true in "
                f"adapter_config.json), or merge it into that base (peftpick merge {adapter.path} --base LOFTQ_BASE)")
        result = _convert_initial_model(adapter, out, init, base, initial_adapter, dtype, say)
        if rank is not None or energy is not None:
            result = _compress(result, out, rank, energy, base, dtype, say)
        return result
    if initial_adapter is not None:
        raise PeftpickError("--initial-adapter applies to PiSSA, OLoRA and CorDA adapters only",
                            "leave it out")

    if peft_type == "LORA" and not config.get("use_dora"):
        if rank is None and energy is None:
            if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
                return _rescale(adapter, out, label)
            ranks = adapter.lora_ranks()
            largest = max(ranks.values(), default=config.get("r"))
            raise PeftpickError(f"{adapter.path} is already a plain LoRA adapter (rank {largest})",
                                "pass --rank R below its rank to compress it, or serve it as it is")
        return _convert_svd(adapter, out, label, rank, energy, base, dtype, say)

    caps = _capabilities(peft_type, kb)
    if caps is not None and caps.lora_conversion is False or caps is None or caps.lora_conversion is None:
        alternatives = []
        if caps is not None and caps.merging:
            alternatives.append(f"merge it into the base (peftpick merge {adapter.path} --base MODEL -o OUT)")
        alternatives.append("retrain as LoRA (peftpick --methods lora ... gives its settings)")
        why = ("learns virtual tokens, not a change of the weights" if caps is not None and not caps.wraps_layers
               else "has no conversion to LoRA in PEFT (convert_to_lora)")
        raise PeftpickError(f"{label} adapters cannot be converted to LoRA: the method {why}", "; or ".join(alternatives))
    if rank is None and energy is None:
        raise PeftpickError(f"converting {label} to LoRA approximates its update by a truncated SVD, which needs a "
                            "target rank", "pass --rank R (e.g. --rank 32) or --energy 0.99")
    return _convert_svd(adapter, out, label, rank, energy, base, dtype, say)


# ---------------------------------------------------------------------------------------------- routes


def _rescale(adapter: SavedAdapter, out: Path, label: str) -> Conversion:
    """Bake each module's own scale (rsLoRA's alpha/sqrt(r), rank_pattern / alpha_pattern) into lora_B, with every
    module padded to the largest rank, so that one r = lora_alpha (scale 1) gives the same update on any stack."""
    import json

    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = dict(adapter.config)
    state = _load_state(adapter)
    ranks = adapter.lora_ranks()
    if any(kind not in ("lora_A", "lora_B") for kind in adapter.tensor_kinds()):
        extra = sorted(set(adapter.tensor_kinds()) - {"lora_A", "lora_B"})
        raise PeftpickError(f"{adapter.path} holds {', '.join(extra)} tensors besides lora_A / lora_B, which a rescale "
                            "cannot carry over", "merge it into the base instead (peftpick merge)")
    largest = max(ranks.values())
    written, layers = {}, []
    for module, rank in sorted(ranks.items()):
        key_a = next(k for k in state if k.endswith(f"{module}.lora_A.weight"))
        key_b = key_a.replace(".lora_A.weight", ".lora_B.weight")
        a, b = state[key_a], state[key_b]
        scale = _module_scale(config, module, rank)
        with torch.no_grad():
            new_a = torch.zeros(largest, a.shape[1], dtype=a.dtype)
            new_a[:rank] = a
            new_b = torch.zeros(b.shape[0], largest, dtype=b.dtype)
            new_b[:, :rank] = (b.float() * scale).to(b.dtype)
            before = (b.float() @ a.float()) * scale
            after = new_b.float() @ new_a.float()
        written[key_a], written[key_b] = new_a.contiguous(), new_b.contiguous()
        layers.append(LayerConversion(module, largest, _relative(before, after),
                                      float(torch.linalg.norm(before).item())))
    out.mkdir(parents=True, exist_ok=True)
    save_file(written, str(out / SAFETENSORS_NAME))
    keep = {k: v for k, v in config.items() if k not in ("rank_pattern", "alpha_pattern", "use_rslora", "r",
                                                          "lora_alpha", "peft_type", "auto_mapping")}
    LoraConfig(**{**_known_lora_fields(keep), "r": largest, "lora_alpha": largest, "use_rslora": False,
                  "rank_pattern": {}, "alpha_pattern": {}}).save_pretrained(str(out))
    new_config = json.loads((out / CONFIG_NAME).read_text())
    what = [w for w, on in (("rsLoRA's alpha/sqrt(r)", config.get("use_rslora")),
                            ("rank_pattern", config.get("rank_pattern")),
                            ("alpha_pattern", config.get("alpha_pattern"))) if on]
    return Conversion(adapter.path, out, label, "rescale", True, largest, tuple(layers),
                      (f"{' and '.join(what) or 'the scale'} baked into lora_B, every module at rank {largest} with "
                       f"lora_alpha = r = {largest} (scale 1): the same update under any stack's alpha / r; no base "
                       "weights needed",), new_config)


def _module_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's LoRA scale of `module`: lora_alpha (or its alpha_pattern entry) over r, or over sqrt(r) for rsLoRA."""
    import re

    alpha = float(config.get("lora_alpha", 8))
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = float(value)
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _known_lora_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    import dataclasses

    from peft import LoraConfig

    names = {f.name for f in dataclasses.fields(LoraConfig)}
    return {k: v for k, v in config.items() if k in names}


def _convert_initial_model(adapter: SavedAdapter, out: Path, init: str, base: str | None,
                           initial_adapter: Path | str | None, dtype: str | None, say: Progress) -> Conversion:
    import json

    import torch
    from peft import get_peft_model, set_peft_model_state_dict

    from peftpick.adapters.models import base_spec, load_base

    label = method_label(adapter.config)
    low = init.lower()
    if initial_adapter is None and not any(low == name for name in _REPRODUCIBLE_INITS):
        why = ("uses a randomised SVD" if low.startswith("pissa_niter") else "is computed from training data")
        raise PeftpickError(f"{label} (init_lora_weights={init!r}) {why}, so its initial adapter cannot be recomputed "
                            "from the base weights", "pass --initial-adapter DIR: the adapter saved right after "
                            "get_peft_model, before training (with init_lora_weights set to true)")
    spec = base_spec(adapter, base, "convert")
    say(f"loading the base model {spec}")
    model, _arch = load_base(spec, adapter, dtype)
    peft_config = _peft_config(adapter)
    peft_config.inference_mode = False
    originals = _target_weights(model, peft_config)
    say(f"recomputing the {label} initialisation of {len(originals)} layers" if initial_adapter is None
        else f"building the {label} adapter")
    with _quiet():
        peft_model = get_peft_model(model, peft_config)
    with tempfile.TemporaryDirectory(prefix="peftpick-initial-") as scratch:
        initial_dir = Path(scratch) / "initial"
        if initial_adapter is not None:
            given = read_adapter(initial_adapter)
            if given.config.get("init_lora_weights") not in (True, None):
                raise PeftpickError(f"the initial adapter {given.path} has init_lora_weights="
                                    f"{given.config.get('init_lora_weights')!r}; PEFT needs it saved with true",
                                    "set init_lora_weights to true in its adapter_config.json")
            shutil.copytree(given.path, initial_dir)
        else:
            peft_model.peft_config["default"].init_lora_weights = True
            peft_model.save_pretrained(str(initial_dir))
            peft_model.peft_config["default"].init_lora_weights = peft_config.init_lora_weights
        trained = _load_state(adapter)
        result = set_peft_model_state_dict(peft_model, trained)
        unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora_" in key]
        if unexpected:
            raise PeftpickError(f"{adapter.path} holds tensors the base model has no place for ({unexpected[0]} ...)",
                                "pass the base model the adapter was trained on")
        say("writing the converted adapter (PEFT save_pretrained with path_initial_model_for_weight_conversion)")
        out.mkdir(parents=True, exist_ok=True)
        with _quiet():
            peft_model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(initial_dir))
    converted = read_adapter(out)
    config = dict(converted.config)
    # The true update on the original base: residual + s * B A - original, per layer.
    from safetensors.torch import load_file

    written = load_file(str(out / SAFETENSORS_NAME))
    layers = []
    for name, module in _lora_layers(peft_model):
        if name not in originals:
            continue
        with torch.no_grad():
            true_update = (module.get_base_layer().weight.float() + module.get_delta_weight("default").float()
                           - originals[name].float())
            new_update = _lora_update(written, name, config)
        layers.append(_layer_error(name, true_update, new_update))
    ranks = converted.lora_ranks()
    dtype = str(next(iter(originals.values())).dtype).removeprefix("torch.") if originals else "?"
    notes = [f"rank {peft_config.r} x 2 = {2 * peft_config.r}: the trained factors and the initial ones side by side "
             "([B | -B0] [A ; A0]), on the original base weights",
             f"exact in exact arithmetic; the error is measured against the {dtype} residual base the adapter was "
             "trained on (its rounding; pass --dtype float32 if it was trained on a float32 residual)"]
    if initial_adapter is None:
        notes.append(f"initial adapter recomputed from the base weights ({label} initialisation is deterministic)")
    return Conversion(adapter.path, out, label, "initial-model", True, max(ranks.values(), default=2 * peft_config.r),
                      tuple(layers), tuple(notes), config)


def _convert_svd(adapter: SavedAdapter, out: Path, label: str, rank: int | None, energy: float | None,
                 base: str | None, dtype: str | None, say: Progress) -> Conversion:
    import json

    import torch
    from peft import convert_to_lora
    from safetensors.torch import save_file

    from peftpick.adapters.models import base_spec, load_adapter_model, load_base

    spec = base_spec(adapter, base, "convert")
    say(f"loading the base model {spec}")
    model, _arch = load_base(spec, adapter, dtype)
    peft_model = load_adapter_model(model, adapter)
    say("measuring each layer's update (merged weight minus base weight)")
    true_updates = _true_updates(peft_model)
    peft_deltas = {name: module.get_delta_weight("default").float() for name, module in _tuner_layers(peft_model)
                   if hasattr(module, "get_delta_weight")}
    faithful = all(name in peft_deltas and _relative(true_updates[name], _as_linear(peft_deltas[name], module))
                   <= _DELTA_MISMATCH for name, module in _tuner_layers(peft_model) if name in true_updates)
    notes = []
    target = rank if rank is not None else energy
    say(f"converting to LoRA ({'rank ' + str(rank) if rank is not None else f'energy {energy:g}'})")
    if faithful:
        try:
            with _quiet():
                lora_config, state = convert_to_lora(peft_model, target)
        except (TypeError, ValueError) as error:
            raise PeftpickError(f"PEFT cannot convert {label} to LoRA: {' '.join(str(error).split())[:300]}",
                                "pick a smaller --rank, or merge into the base instead (peftpick merge)") from None
        notes.append("PEFT convert_to_lora: truncated SVD of each layer's update")
    else:
        lora_config, state = _svd_of_updates(peft_model, true_updates, rank, energy)
        notes.append(f"PEFT's convert_to_lora leaves part of the {label} update out (its get_delta_weight differs "
                     "from the merged weight), so each layer was converted from the merged weight minus the base "
                     "weight instead, by the same truncated SVD")
    out.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(out / SAFETENSORS_NAME))
    lora_config.save_pretrained(str(out))
    config = json.loads((out / CONFIG_NAME).read_text())
    layers = []
    for name, _module in _tuner_layers(peft_model):
        if name in true_updates:
            layers.append(_layer_error(name, true_updates[name], _lora_update(state, name, config)))
    ranks = read_adapter(out).lora_ranks()
    return Conversion(adapter.path, out, label, "svd", False, max(ranks.values(), default=rank or 0), tuple(layers),
                      tuple(notes), config)


def _compress(result: Conversion, out: Path, rank: int | None, energy: float | None, base: str | None,
              dtype: str | None, say: Progress) -> Conversion:
    """An exact conversion, then an SVD to a smaller rank; errors measured against the original update."""
    with tempfile.TemporaryDirectory(prefix="peftpick-exact-") as scratch:
        exact_dir = Path(scratch) / "exact"
        shutil.copytree(out, exact_dir)
        shutil.rmtree(out)
        exact = read_adapter(exact_dir)
        compressed = _convert_svd(exact, out, result.from_method, rank, energy, base, dtype, say)
    by_module = {layer.module: layer for layer in result.layers}
    layers = []
    for layer in compressed.layers:
        first = by_module.get(layer.module)
        # errors of the two steps add at most (triangle inequality); the SVD step's is measured on the exact result
        combined = layer.relative_error + (first.relative_error if first else 0.0)
        layers.append(LayerConversion(layer.module, layer.rank, combined, first.update_norm if first else layer.update_norm))
    return Conversion(result.source, out, result.from_method, "initial-model + svd", False, compressed.rank,
                      tuple(layers), result.notes + compressed.notes, compressed.config)


# ---------------------------------------------------------------------------------------------- helpers


def _capabilities(peft_type: str, kb: Any):
    from peftpick.knowledge.capabilities import load_capabilities

    table = kb.capabilities if kb is not None else load_capabilities()
    return table.get(peft_type)


def _prepare_output(out: Path, source: Path) -> Path:
    if out.resolve() == source.resolve():
        raise PeftpickError(f"-o {out} is the adapter being converted", "write the result to a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PeftpickError(f"{out} already exists and is not empty", "pass a new folder to -o, or remove it first")
    if not out.parent.exists():
        raise PeftpickError(f"the folder {out.parent} for -o does not exist", "create it first, or pick another path")
    return out


def _peft_config(adapter: SavedAdapter):
    from peftpick.adapters.files import read_adapter_config

    _raw, config = read_adapter_config(adapter.path)
    return config


def _load_state(adapter: SavedAdapter) -> dict[str, Any]:
    if adapter.weights_file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(adapter.weights_file))
    import torch

    return torch.load(adapter.weights_file, map_location="cpu", weights_only=True)


def _target_weights(model: Any, peft_config: Any) -> dict[str, Any]:
    """Copies of the weights the adapter will wrap, keyed as PeftModel names them (base_model.model.<name>)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    weights = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not name or not check_target_module_exists(peft_config, name):
            continue
        weights[f"base_model.model.{name}"] = weight.detach().clone()
    return weights


def _tuner_layers(peft_model: Any):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in peft_model.named_modules() if isinstance(module, BaseTunerLayer)]


def _lora_layers(peft_model: Any):
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]


def _as_linear(update: Any, module: Any) -> Any:
    """An update in nn.Linear's (out, in) layout; transformers' Conv1D stores weights transposed."""
    from transformers.pytorch_utils import Conv1D

    return update.T if isinstance(module.get_base_layer(), Conv1D) else update


def _true_updates(peft_model: Any) -> dict[str, Any]:
    """Layer name -> merged weight minus base weight (float32, Linear layout), one layer merged at a time."""
    import torch

    updates = {}
    for name, module in _tuner_layers(peft_model):
        base_layer = module.get_base_layer()
        weight = getattr(base_layer, "weight", None)
        if weight is None or not hasattr(module, "merge"):
            continue
        with torch.no_grad():
            before = weight.detach().float().clone()
            try:
                module.merge(adapter_names=["default"])
            except (NotImplementedError, ValueError, TypeError, AttributeError):
                continue
            after = base_layer.weight.detach().float().clone()
            module.unmerge()
        updates[name] = _as_linear(after - before, module)
    return updates


def _svd_of_updates(peft_model: Any, updates: Mapping[str, Any], rank: int | None, energy: float | None):
    """(LoraConfig, state dict) from truncated SVDs of the given updates, keyed as convert_to_lora keys them."""
    import torch
    from peft import LoraConfig

    from peft.tuners.lora.conversion import _find_cutoff_index

    state, ranks = {}, {}
    prefix = "base_model.model."
    for name, update in updates.items():
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(update.float(), full_matrices=False)
        keep = rank if rank is not None else _find_cutoff_index(s, threshold=energy)
        if keep > s.numel():
            raise PeftpickError(f"--rank {keep} is larger than layer {name.removeprefix(prefix)} allows ({s.numel()})",
                                "pick a smaller --rank")
        state[f"{name}.lora_A.weight"] = vh[:keep].contiguous()
        state[f"{name}.lora_B.weight"] = (u[:, :keep] * s[:keep]).contiguous()
        ranks[name.removeprefix(prefix)] = keep
    source = peft_model.peft_config["default"]
    common = rank if rank is not None else 1
    config = LoraConfig(r=common, lora_alpha=common, target_modules=sorted(ranks),
                        rank_pattern={} if rank is not None else dict(ranks),
                        alpha_pattern={} if rank is not None else dict(ranks),
                        base_model_name_or_path=getattr(source, "base_model_name_or_path", None),
                        task_type=getattr(source, "task_type", None))
    return config, state


def _lora_update(state: Mapping[str, Any], name: str, config: Mapping[str, Any]) -> tuple[Any, int]:
    """(scaling * B @ A, rank) of layer `name` in a LoRA state dict (keys with or without the adapter name)."""
    import re

    import torch

    def find(part: str):
        for key in (f"{name}.{part}.weight", f"{name}.{part}.default.weight"):
            if key in state:
                return state[key]
        short = name.removeprefix("base_model.model.")
        for key, value in state.items():
            if key.endswith(f"{short}.{part}.weight"):
                return value
        raise KeyError(name)

    a, b = find("lora_A").float(), find("lora_B").float()
    rank = a.shape[0]
    module = name.removeprefix("base_model.model.")
    alpha = float(config.get("lora_alpha", rank))
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = float(value)
            break
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    with torch.no_grad():
        return (b @ a) * scale, rank


def _relative(reference: Any, other: Any) -> float:
    import torch

    norm = torch.linalg.norm(reference).item()
    if norm == 0:
        return 0.0 if torch.linalg.norm(other).item() == 0 else math.inf
    return torch.linalg.norm(reference - other).item() / norm


def _layer_error(name: str, true_update: Any, converted: tuple[Any, int]) -> LayerConversion:
    import torch

    new_update, rank = converted
    return LayerConversion(module=name.removeprefix("base_model.model."), rank=rank,
                           relative_error=_relative(true_update, new_update.to(true_update.dtype)),
                           update_norm=float(torch.linalg.norm(true_update).item()))


class _quiet:
    """Silence PEFT's and transformers' warnings about the conversion itself."""

    def __enter__(self):
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)
        return False


# ---------------------------------------------------------------------------------------------- image tools


def export_adapter(path: Path | str, output: Path | str, fmt: str, *, rank: int | None = None,
                   energy: float | None = None, base: str | None = None, initial_adapter: Path | str | None = None,
                   dtype: str | None = None, pipeline: str | None = None, family: str | None = None,
                   progress: Progress | None = None) -> tuple[Conversion | None, Any]:
    """Write a denoiser adapter in an image tool's file format: "diffusers" (a folder for the pipeline's
    `load_lora_weights`) or "kohya" (one .safetensors file for ComfyUI, Forge, InvokeAI).

    An adapter whose init rewrote the base (PiSSA ...), or with `rank` / `energy` given, is converted to plain
    LoRA first (`convert_adapter`); the pipeline class and family come from the base model when not given.
    Returns (the conversion, or None, and the `adapters.formats.WrittenAdapter`).
    """
    from peftpick.adapters.formats import to_diffusers_format, to_kohya_format

    if fmt not in ("diffusers", "kohya"):
        raise PeftpickError(f"--format {fmt} is not a format peftpick writes", "use --format diffusers or kohya")
    adapter = read_adapter(path)
    out = Path(output)
    if fmt == "kohya" and out.suffix != ".safetensors":
        raise PeftpickError(f"-o {out}: a kohya adapter is one .safetensors file", f"pass e.g. -o {out}.safetensors")
    if out.exists():
        raise PeftpickError(f"{out} already exists", "pass a new path to -o, or remove it first")
    if not out.parent.exists():
        raise PeftpickError(f"the folder {out.parent} for -o does not exist", "create it first, or pick another path")
    if pipeline is None or family is None:
        denoiser = _denoiser_of(adapter, base)
        pipeline = pipeline or denoiser.pipeline_class
        family = family or denoiser.family
    needs_lora = (rank is not None or energy is not None or initial_adapter is not None
                  or (adapter.peft_type == "LORA" and rewriting_init(adapter.config) is not None))
    with tempfile.TemporaryDirectory(prefix="peftpick-export-") as scratch:
        conversion = None
        source = adapter.path
        if needs_lora:
            conversion = convert_adapter(adapter.path, Path(scratch) / "lora", rank=rank, energy=energy, base=base,
                                         initial_adapter=initial_adapter, dtype=dtype, progress=progress)
            source = conversion.output
        if progress:
            progress(f"writing the {fmt} format")
        if fmt == "diffusers":
            written = to_diffusers_format(source, out, pipeline)
        else:
            written = to_kohya_format(source, out, family)
        if conversion is not None:
            import dataclasses

            conversion = dataclasses.replace(conversion, output=written.path)
    return conversion, written


def _denoiser_of(adapter: SavedAdapter, base: str | None):
    """The Denoiser facts of the adapter's base model (--base, or a base_model_name_or_path peftpick resolves)."""
    from peftpick.knowledge.architectures import resolve_model

    spec = base or adapter.base_model
    if not spec:
        raise PeftpickError(f"{adapter.path} does not say which model it was trained on",
                            "pass --base with the diffusion model (a bundled name such as flux.2-klein-4b, or its "
                            "folder), or --pipeline and --family")
    arch = resolve_model(spec)
    if arch.denoiser is None:
        raise PeftpickError(f"{spec} is a language model; image formats are for diffusion denoisers",
                            "drop --format, or pass the diffusion model with --base")
    return arch.denoiser
