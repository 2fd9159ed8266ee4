"""Model registry, model resolution and architecture figures.

`resolve_model` turns what a user typed (a bundled name or alias, a local folder or config.json, a
`transformers.PretrainedConfig`, or a hub id) into a `peftpick.types.Architecture`. Every figure comes from a
transformers config object, so the numbers peftpick reports are the ones `AutoModelForCausalLM.from_config` builds.

The bundled registry (`data/architectures.json`) holds the config.json keys of popular open causal LMs, each with
the URL it was taken from and how it was checked; it lets peftpick work offline. Nothing is cached at module level:
`load_registry()` reads the file each time it is called.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.types import Architecture

DEFAULT_DTYPE = "bfloat16"

# Config keys that hold each figure, in the order families use them (GPT-2 predates the modern names).
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads")
_VOCAB_KEYS = ("vocab_size",)
_REQUIRED_FIGURES = {
    "hidden size": _HIDDEN_KEYS,
    "number of layers": _LAYER_KEYS,
    "number of attention heads": _HEAD_KEYS,
    "vocabulary size": _VOCAB_KEYS,
}
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "top_k_experts")  # Gemma 4 spells it top_k_experts
# Figures a family may state once per layer: Gemma 3n's intermediate_size is a list of widths, one per layer.
_PER_LAYER_FIGURES = frozenset({"intermediate_size"})

# "org/name" as the Hugging Face hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SEPARATORS = re.compile(r"[\s._-]+")


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class RegistryEntry:
    """One bundled model: its config.json keys and where they came from."""

    name: str
    display_name: str
    family: str
    hub_id: str
    aliases: tuple[str, ...]
    config: Mapping[str, Any] = field(repr=False)
    source_url: str
    source_checked: str
    published_params: int | None = None
    published_params_source: str | None = None
    notes: str | None = None

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    def lookup_keys(self) -> set[str]:
        """Every spelling that should find this entry, normalised with `normalize_model_name`."""
        spellings = {self.name, self.display_name, self.hub_id, self.hub_id.split("/", 1)[-1], *self.aliases}
        return {normalize_model_name(spelling) for spelling in spellings}


def normalize_model_name(text: str) -> str:
    """Lower-case `text` and drop `-`, `_`, `.` and spaces, so "Llama_3.2-3B" and "llama-3.2-3b" compare equal."""
    return _SEPARATORS.sub("", text.strip().lower())


@dataclass(frozen=True)
class Registry:
    """The bundled models, searchable by name, alias or hub id (case and separators ignored)."""

    entries: tuple[RegistryEntry, ...]
    # where resolved entries are kept between runs (a disk_cache.JsonTable; see _architecture_from_entry)
    cache: Any = field(default=None, repr=False, compare=False)
    _index: Mapping[str, RegistryEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        entries = tuple(self.entries)
        index: dict[str, RegistryEntry] = {}
        for entry in entries:
            for key in entry.lookup_keys():
                other = index.get(key)
                if other is not None and other is not entry:
                    # Two models answering to one spelling would make lookups depend on file order.
                    raise ValueError(f"registry spelling {key!r} names both {other.name} and {entry.name}")
                index[key] = entry
        object.__setattr__(self, "entries", entries)
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.entries)

    def with_cache(self, cache: Any) -> Registry:
        """This registry, resolving its entries through `cache` (None: without one)."""
        return dataclasses.replace(self, cache=cache)

    def __iter__(self) -> Iterator[RegistryEntry]:
        return iter(self.entries)

    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    def lookup(self, name: str) -> RegistryEntry | None:
        """The entry whose name, alias or hub id matches `name`, or None."""
        return self._index.get(normalize_model_name(name))

    def closest_names(self, name: str, limit: int = 3) -> list[str]:
        """Registry names closest to `name` (by name and alias spelling), best first."""
        query = normalize_model_name(name.split("/")[-1])
        spellings = {key.split("/")[-1]: entry.name for key, entry in self._index.items()}
        suggestions: list[str] = []
        for spelling in difflib.get_close_matches(query, list(spellings), n=limit * 4, cutoff=0.6):
            if spellings[spelling] not in suggestions:
                suggestions.append(spellings[spelling])
        return suggestions[:limit]


def _entry_from_json(raw: Mapping[str, Any], data_file: str) -> RegistryEntry:
    try:
        source = raw["source"]
        return RegistryEntry(
            name=raw["name"],
            display_name=raw.get("display_name", raw["name"]),
            family=raw.get("family", raw["config"]["model_type"]),
            hub_id=raw["hub_id"],
            aliases=tuple(raw.get("aliases", ())),
            config=dict(raw["config"]),
            source_url=source["url"],
            source_checked=source.get("checked", ""),
            published_params=raw.get("published_params"),
            published_params_source=raw.get("published_params_source"),
            notes=raw.get("notes"),
        )
    except KeyError as missing:
        raise ValueError(f"{data_file}: entry {raw.get('name', '?')!r} lacks {missing}") from None


def load_registry(data_dir: Path | None = None) -> Registry:
    """Read `architectures.json` from `data_dir`, or the copy bundled with peftpick."""
    if data_dir is None:
        data_file = resources.files("peftpick.knowledge") / "data" / "architectures.json"
    else:
        data_file = Path(data_dir) / "architectures.json"
    document = json.loads(data_file.read_text(encoding="utf-8"))
    return Registry(tuple(_entry_from_json(raw, str(data_file)) for raw in document["models"]))


# --------------------------------------------------------------------------------------------- figures


def _stated(config: Any, key: str) -> Any:
    """`key` of a config.json mapping or a PretrainedConfig, None where unset. A heterogeneous config (Gemma 4 gives
    its full-attention layers their own head_dim and KV heads in `per_layer_config`) refuses to read such a figure
    globally; its global value (the one the other layers use) is read here."""
    if isinstance(config, Mapping):
        return config.get(key)
    unchecked = getattr(config, "_getattr_without_heterogeneous_validation", None)
    if unchecked is not None:
        return unchecked(key, None)
    return getattr(config, key, None)


def _first_present(config: Any, keys: tuple[str, ...]) -> Any:
    """The first attribute (or mapping key) among `keys` that is set and not None."""
    for key in keys:
        value = _stated(config, key)
        if value is not None:
            return value
    return None


def _widest(value: Any) -> Any:
    """One figure for a per-layer list (the widest layer); other values as they are."""
    return max(value) if isinstance(value, (list, tuple)) and value else value


def _explicit_dtype(config: Any) -> str | None:
    """The dtype a config states (config.json's torch_dtype, transformers 5's dtype), as "bfloat16"; None if unset."""
    # Read __dict__ for the legacy name: the torch_dtype property logs a deprecation warning.
    dtype = getattr(config, "dtype", None) or getattr(config, "__dict__", {}).get("torch_dtype")
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _causal_lm_class_name(model_type: str) -> str | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def _is_text_decoder(model_type: str) -> bool:
    """True when AutoModelForCausalLM builds a plain text decoder (not a multimodal wrapper) for `model_type`."""
    class_name = _causal_lm_class_name(model_type)
    return class_name is not None and class_name.endswith(("ForCausalLM", "LMHeadModel"))


def text_config_of(config: Any) -> tuple[Any, str | None]:
    """The config of the text decoder to fine-tune, and a note when it is the text part of a wrapper.

    Multimodal checkpoints such as Gemma 3 4B+ (`gemma3`, built as Gemma3ForConditionalGeneration) carry their
    language model in `text_config`; peftpick sizes and targets that decoder. Anything else that
    AutoModelForCausalLM cannot build as a text decoder is refused with a PeftpickError.
    """
    model_type = getattr(config, "model_type", "") or ""
    if _is_text_decoder(model_type):
        return config, None
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    text_type = getattr(text_config, "model_type", "") or ""
    if text_config is not config and _is_text_decoder(text_type):
        return text_config, f"text decoder ({text_type}) of the {model_type} checkpoint"
    raise PeftpickError(
        f"model type {model_type!r} is not a causal language model that transformers can build as a text decoder",
        "peftpick recommends methods for decoder-only text models (Llama, Qwen, Mistral, Gemma, Phi, ...); "
        "pass the config of such a model",
    )


def layer_differences(arch: Architecture) -> list[str]:
    """How the decoder layers of `arch` differ from each other beyond their attention pattern (layer_types),
    in words; [] where every layer of a type is built alike. A model with differences cannot be estimated from a
    few traced layers repeated to its depth: every layer must be traced.

    Gemma 3n states intermediate_size once per layer and keeps only the top activations of its first layers
    (activation_sparsity_pattern); Gemma 3n and Gemma 4 E2B / E4B end in layers that reuse earlier keys and values
    (num_kv_shared_layers: no k_proj / v_proj, and Gemma 4 E2B's double-wide MLPs); a per_layer_config whose
    overrides do not follow the layer types changes single layers.
    """
    config = arch.config
    found = []
    widths = config.get("intermediate_size")
    if isinstance(widths, list):
        found.append("intermediate_size per layer" + ("" if len(set(widths)) > 1 else " (all alike)"))
    sparsity = config.get("activation_sparsity_pattern")
    if isinstance(sparsity, list) and len(set(sparsity)) > 1:
        found.append("activation sparsity on some layers only")
    shared = config.get("num_kv_shared_layers")
    if _whole(shared) and shared > 0:
        found.append(f"the last {shared} layers reuse earlier keys and values (num_kv_shared_layers)")
    per_layer = config.get("per_layer_config")
    layer_types = config.get("layer_types")
    if isinstance(per_layer, Mapping) and per_layer:
        try:
            by_index = {int(index): values for index, values in per_layer.items()}
        except (TypeError, ValueError):
            by_index = None
        by_type: dict[str, Any] = {}
        if by_index is None or not isinstance(layer_types, list) or not all(
                by_type.setdefault(kind, by_index.get(i, {})) == by_index.get(i, {})
                for i, kind in enumerate(layer_types)):
            found.append("per_layer_config overrides single layers")
    return found


def context_length(arch: Architecture) -> int | None:
    """The longest sequence the model's position embeddings (or RoPE settings) take, from its config."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = arch.config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_seq_len(arch: Architecture, seq_len: int) -> None:
    limit = context_length(arch)
    if limit is not None and seq_len > limit:
        raise PeftpickError(f"--seq-len {seq_len} is beyond the context length of {arch.name} ({limit:,} tokens, "
                            "max_position_embeddings in its config)", f"pass --seq-len {limit} or less")


def _refuse_non_causal(config: Any, name: str) -> None:
    """Encoder-only (BERT-like) models: transformers lists some of them as causal LMs too (BertLMHeadModel), but
    their checkpoints are encoders with no causal-LM training step to plan. (Encoder-decoder and other
    non-decoder types fail in text_config_of.)"""
    model_type = getattr(config, "model_type", "")
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False):
        raise PeftpickError(f"{name} is an encoder-only model ({model_type}): peftpick plans causal language models "
                            "(decoder-only, trained on next-token prediction) and diffusion denoisers",
                            "pass a decoder-only model such as Llama, Qwen, Mistral, Gemma or SmolLM "
                            "(`peftpick models` lists them)")


def architecture_from_config(
    config: Any,
    name: str,
    source: str,
    hub_id: str | None = None,
    local_path: str | None = None,
) -> Architecture:
    """Architecture figures of a transformers config, with fallbacks across families.

    GPT-2 spells its figures n_embd / n_layer / n_head; `head_dim` defaults to hidden/heads and the KV head count
    to the head count. For mixture-of-experts models `intermediate_size` is one expert's FFN width
    (`moe_intermediate_size` where the family has it) and `num_experts` / `experts_per_token` are filled in. A
    per-layer `intermediate_size` (Gemma 3n: one width per layer) gives its widest layer; the full list stays in
    `Architecture.config`. Where layers override figures (Gemma 4's `per_layer_config`: wider heads and fewer KV
    heads on full-attention layers), `head_dim` and `num_kv_heads` are the global values the other layers use.
    """
    _refuse_non_causal(config, name)
    text_config, text_note = text_config_of(config)
    if text_note:
        source = f"{source}; {text_note}"
    figures = {
        label: _first_present(text_config, keys) for label, keys in _REQUIRED_FIGURES.items()
    }
    missing = [label for label, value in figures.items() if value is None]
    if missing:
        raise PeftpickError(
            f"the config of {name} has no {', '.join(missing)}",
            "pass the model's original config.json",
        )
    check_config_figures(text_config, f"the config of {name}")
    hidden = int(figures["hidden size"])
    heads = int(figures["number of attention heads"])
    kv_heads = int(_first_present(text_config, ("num_key_value_heads", "num_kv_heads", "n_head_kv")) or heads)
    head_dim = int(_first_present(text_config, ("head_dim",)) or hidden // heads)
    num_experts = int(_first_present(text_config, _EXPERT_COUNT_KEYS) or 0)
    experts_per_token = int(_first_present(text_config, _EXPERTS_PER_TOKEN_KEYS) or 0) if num_experts else 0
    intermediate_keys = ("moe_intermediate_size", "intermediate_size") if num_experts else ("intermediate_size",)
    # GPT-2 leaves n_inner unset and uses 4 x hidden.
    intermediate = _widest(_first_present(text_config, (*intermediate_keys, "n_inner", "ffn_dim"))) or 4 * hidden
    tie = getattr(text_config, "tie_word_embeddings", None)
    if tie is None:
        tie = getattr(config, "tie_word_embeddings", True)
    return Architecture(
        name=name,
        model_type=text_config.model_type,
        hidden_size=hidden,
        num_layers=int(figures["number of layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(intermediate),
        vocab_size=int(figures["vocabulary size"]),
        tie_word_embeddings=bool(tie),
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        dtype=_explicit_dtype(text_config) or _explicit_dtype(config) or DEFAULT_DTYPE,
        source=source,
        hub_id=hub_id,
        local_path=local_path,
        config=text_config.to_dict(),
    )


# --------------------------------------------------------------------------------------------- resolution


def _config_class(model_type: str, where: str) -> Any:
    from transformers import CONFIG_MAPPING, __version__

    if model_type not in CONFIG_MAPPING:
        raise PeftpickError(
            f"{where} has model_type {model_type!r}, which transformers {__version__} does not know",
            "upgrade transformers if the model is newer, or check the model_type spelling",
        )
    return CONFIG_MAPPING[model_type]


def _missing_figures(raw: Mapping[str, Any]) -> list[str]:
    """Figures a top-level config.json must state (defaults would silently describe another model)."""
    return [
        f"{label} ({' / '.join(repr(key) for key in keys)})"
        for label, keys in _REQUIRED_FIGURES.items()
        if _first_present(raw, keys) is None
    ]


# Bounds on the figures a config may state: well beyond any released model, far below what would make a traced
# build allocate (PEFT builds adapter weights on the CPU) or take minutes. Checked before anything is built.
_FIGURE_LIMITS = {
    **{key: 1 << 17 for key in _HIDDEN_KEYS},
    **{key: 1 << 10 for key in _LAYER_KEYS},
    **{key: 1 << 12 for key in (*_HEAD_KEYS, "num_key_value_heads", "num_kv_heads", "n_head_kv", "head_dim",
                                 "global_head_dim", "num_global_key_value_heads")},
    **{key: 1 << 23 for key in _VOCAB_KEYS},
    **{key: 1 << 20 for key in ("intermediate_size", "moe_intermediate_size", "n_inner", "ffn_dim")},
    **{key: 1 << 12 for key in (*_EXPERT_COUNT_KEYS, *_EXPERTS_PER_TOKEN_KEYS)},
    **{key: 1 << 26 for key in ("max_position_embeddings", "n_positions")},
}
_MAY_BE_ZERO = {"num_experts", "num_local_experts", "n_routed_experts", *_EXPERTS_PER_TOKEN_KEYS}


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Other config.json keys peftpick reads itself, with the JSON they must hold where they are not null.
_FIELD_TYPES = {
    "architectures": (_strings, "a list of strings"),
    "layer_types": (_strings, "a list of strings"),
    "mlp_only_layers": (lambda v: isinstance(v, list) and all(_whole(i) for i in v), "a list of whole numbers"),
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false"),
    "is_decoder": (lambda v: isinstance(v, bool), "true or false"),
    "is_encoder_decoder": (lambda v: isinstance(v, bool), "true or false"),
    "torch_dtype": (lambda v: isinstance(v, str), "a string such as \"bfloat16\""),
    "dtype": (lambda v: isinstance(v, str), "a string such as \"bfloat16\""),
    "text_config": (lambda v: isinstance(v, dict), "an object"),
    "rope_scaling": (lambda v: isinstance(v, dict), "an object"),
    "first_k_dense_replace": (_whole, "a whole number"),
    "decoder_sparse_step": (_whole, "a whole number"),
}


def _first_clause(error: BaseException) -> str:
    return " ".join(str(error).split(";")[0].split())[:160]


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # a PretrainedConfig attribute that is no JSON value
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_config_figures(config: Any, where: str) -> None:
    """PeftpickError unless every size figure `config` states (a config.json mapping or a PretrainedConfig) is a
    whole number within `_FIGURE_LIMITS` (a per-layer figure such as Gemma 3n's intermediate_size may be a list of
    them, one per layer, each within the same limit), the other keys peftpick reads hold the JSON `_FIELD_TYPES`
    says (for a mapping), and the attention heads divide into key/value groups."""
    for key, limit in _FIGURE_LIMITS.items():
        _check_figure(key, _stated(config, key), limit, where, _stated(config, "num_hidden_layers"))
    overrides = getattr(getattr(config, "__dict__", {}).get("_heterogeneity_spec"), "per_layer_overrides", None)
    for layer, settings in (overrides or {}).items():  # a PretrainedConfig's per_layer_config
        for key, value in settings.items():
            if key in _FIGURE_LIMITS:
                _check_figure(key, value, _FIGURE_LIMITS[key], f"{where} (per_layer_config of layer {layer})", None)
    if isinstance(config, Mapping):
        for key, (fits, expected) in _FIELD_TYPES.items():
            value = config.get(key)
            if value is not None and not fits(value):
                raise PeftpickError(f"{where}: {key} is {_shown(value)}, expected {expected}",
                                    "use the model's original config.json")
    heads = _first_present(config, _HEAD_KEYS)
    kv_heads = _first_present(config, ("num_key_value_heads", "num_kv_heads", "n_head_kv"))
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise PeftpickError(f"{where}: {heads} attention heads do not split into {kv_heads} key/value heads",
                            "use the model's original config.json (the head count is a multiple of the KV head count)")


def _check_figure(key: str, value: Any, limit: int, where: str, layers: Any) -> None:
    if value is None:
        return
    low = 0 if key in _MAY_BE_ZERO else 1
    fix = "use the model's original config.json"
    if key in _PER_LAYER_FIGURES and isinstance(value, (list, tuple)):
        if not value:
            raise PeftpickError(f"{where}: {key} is [], expected a whole number or one per layer", fix)
        for index, item in enumerate(value):
            if not _whole(item) or not low <= item <= limit:
                raise PeftpickError(f"{where}: {key}[{index}] is {_shown(item)}, expected a whole number from {low} "
                                    f"to {limit:,}", fix)
        if _whole(layers) and len(value) != layers:
            raise PeftpickError(f"{where}: {key} lists {len(value)} widths for {layers} layers, expected one per "
                                "layer (or a single number)", fix)
        return
    if not _whole(value) or not low <= value <= limit:
        raise PeftpickError(f"{where}: {key} is {_shown(value)}, expected a whole number from {low} to {limit:,}", fix)


def _read_local_config(config_file: Path) -> Architecture:
    where = f"config.json at {config_file}"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PeftpickError(
            f"{where} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})",
            "fix the file, or download the model's config.json again",
        ) from None
    except UnicodeDecodeError:
        raise PeftpickError(f"{where} is not UTF-8 text", "fix the file, or download the model's config.json again") \
            from None
    except (ValueError, RecursionError) as error:  # a number too long for int(), nesting too deep
        raise PeftpickError(f"{where} cannot be read as JSON ({_first_clause(error)})",
                            "fix the file, or download the model's config.json again") from None
    except OSError as error:
        raise PeftpickError(f"cannot read {where} ({error})", "check the path and its permissions") from None
    if not isinstance(raw, dict):
        raise PeftpickError(f"{where} is not a JSON object", "pass the model's original config.json")
    model_type = raw.get("model_type")
    if not model_type:
        raise PeftpickError(
            f"{where} is missing 'model_type'",
            "peftpick needs it to know the architecture (e.g. \"llama\"); use the model's original config.json",
        )
    if not isinstance(model_type, str):
        raise PeftpickError(f"{where}: model_type is {json.dumps(model_type)[:60]}, expected a string (\"llama\")",
                            "use the model's original config.json")
    check_config_figures(raw, where)
    if isinstance(raw.get("text_config"), dict):
        check_config_figures(raw["text_config"], f"{where} (text_config)")
    config_class = _config_class(str(model_type), where)
    # A multimodal wrapper keeps its decoder in text_config and relies on that family's defaults there.
    if not _is_text_decoder(str(model_type)) and isinstance(raw.get("text_config"), dict):
        missing = []
    else:
        missing = _missing_figures(raw)
    if missing:
        raise PeftpickError(
            f"{where} is missing {', '.join(missing)}",
            "without it the figures would be transformers defaults for another model; use the model's "
            "original config.json",
        )
    try:
        config = config_class.from_dict(raw)
    except Exception as error:  # noqa: BLE001 - transformers' strict field checks raise their own error types
        message = " ".join(str(error).split())
        raise PeftpickError(
            f"transformers cannot read {where}: {message[:300]}", "use the model's original config.json"
        ) from None
    folder = config_file.parent
    arch = architecture_from_config(
        config,
        name=folder.name or str(folder),
        source=f"local config.json at {config_file}",
        local_path=str(folder),
    )
    _check_runs(arch, where)
    return arch


def _check_runs(arch: Architecture, where: str) -> None:
    """Build two layers of `arch` on the meta device and run 8 tokens through them, so that a value transformers
    accepts but cannot use (an unknown hidden_act, a pad_token_id past the vocabulary, a sliding_window that is
    text) is one PeftpickError naming the file, not a failure later blamed on a method."""
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    from peftpick.estimator.tracer import MetaValues

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(arch, device="meta", num_layers=min(arch.num_layers, 2))
            with torch.no_grad(), MetaValues(lambda shape: math.prod(shape)):
                model(input_ids=torch.zeros((1, 8), dtype=torch.long, device="meta"))
    except PeftpickError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever transformers raises for a value it cannot use
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__
        raise PeftpickError(f"{where} describes a model transformers cannot build or run ({reason})",
                            "use the model's original config.json") from None
    finally:
        hf_logging.set_verbosity(level)


def _suggestion_list(registry: Registry, limit: int = 5) -> str:
    return ", ".join(registry.names()[:limit]) + ", ..."


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a connection. Without this check, transformers retries an unreachable
    hub for half a minute before it fails."""
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _read_hub_config(hub_id: str, registry: Registry) -> Architecture:
    from transformers import AutoConfig

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    offline = offline or not _hub_reachable()
    try:
        # local_files_only keeps an offline run from waiting on network timeouts: only the local cache is read.
        config = AutoConfig.from_pretrained(hub_id, local_files_only=offline, trust_remote_code=False)
    except Exception as error:  # transformers raises OSError, ValueError or hub errors depending on the failure
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        problem = (
            f"cannot read the config of {hub_id}: the Hugging Face hub is not reachable (or HF_HUB_OFFLINE is set) "
            "and it is not in the local cache"
            if offline
            else f"cannot read the config of {hub_id} from the Hugging Face hub ({reason[:200]})"
        )
        raise PeftpickError(
            problem,
            f"download it (e.g. `hf download {hub_id} config.json --local-dir ./{hub_id.split('/')[-1]}`) and pass "
            f"the local folder, or use one of the bundled names: {_suggestion_list(registry)} "
            "(`peftpick models` lists them all)",
        ) from None
    return architecture_from_config(
        config, name=hub_id, source=f"hub config of {hub_id} via transformers", hub_id=hub_id
    )


def _architecture_from_entry(entry: RegistryEntry, cache: Any = None) -> Architecture:
    """The architecture of a bundled entry, built by transformers from its figures. `cache` (a disk_cache.JsonTable)
    keeps the result, so that a later run resolves the name without importing transformers."""
    if cache is not None:
        key, parts = cache.key({"entry": {"name": entry.name, "hub_id": entry.hub_id, "config": dict(entry.config),
                                          "source_url": entry.source_url}, "layout": 1})
        stored = cache.get(key)
        if isinstance(stored, dict) and stored.get("denoiser") is None:
            with contextlib.suppress(TypeError):
                return Architecture(**stored)
    from transformers import AutoConfig

    # a deep copy: transformers rewrites nested settings (rope parameters) in place, which would change the entry
    settings = copy.deepcopy(dict(entry.config))
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    arch = architecture_from_config(
        config,
        name=entry.name,
        source=f"bundled registry (source: {entry.source_url})",
        hub_id=entry.hub_id,
    )
    if cache is not None:
        # this run gets what the next run will read back (JSON turns id2label's int keys into text, which
        # transformers turns back), so both trace and key the same architecture
        stored = json.loads(json.dumps(dataclasses.asdict(with_facts(arch))))
        cache.put(key, stored, parts, entry.name)
        arch = Architecture(**stored)
    return arch


def with_facts(arch: Architecture) -> Architecture:
    """`arch` with its facts worked out (one meta-device build each): the parameter count, the first decoder
    layer's linear modules and its fused expert weights, in the JSON form they are cached in."""
    from peftpick.knowledge.targets import decoder_layer_modules, expert_parameters

    facts = {"parameter_count": count_parameters(arch),
             "layer_modules": [dataclasses.asdict(module) for module in decoder_layer_modules(arch)],
             "expert_parameters": [dataclasses.asdict(parameter) for parameter in expert_parameters(arch)]}
    return dataclasses.replace(arch, facts=facts)


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith(".json") or text.count("/") >= 2 or "\\" in text


def resolve_model(spec: Any, registry: Registry | None = None, cache: Any = None) -> Architecture:
    """Architecture for `spec`: a bundled name/alias/hub id, a local folder or config.json, a PretrainedConfig, a
    loaded PreTrainedModel (its config), or a hub id read with `transformers.AutoConfig.from_pretrained`.
    `cache`: a disk_cache.JsonTable for bundled names (see _architecture_from_entry); default: the registry's.

    Raises PeftpickError (problem; fix) for unknown names (with the closest bundled names), unreadable or
    malformed config files, hub failures and non-causal-LM architectures.
    """
    if isinstance(spec, (str, os.PathLike)):  # transformers (and torch under it) is imported only if needed
        PretrainedConfig = PreTrainedModel = ()
    else:
        from transformers import PretrainedConfig, PreTrainedModel

    if isinstance(spec, PreTrainedModel) or (hasattr(spec, "get_base_model")
                                             and isinstance(spec.get_base_model(), PreTrainedModel)):
        # a loaded model (a PeftModel too): its config is the architecture; its weights are not read
        base = spec.get_base_model() if hasattr(spec, "get_base_model") else spec
        config = base.config
        name = getattr(config, "name_or_path", "") or config.model_type
        return architecture_from_config(config, name=name, source=f"loaded model ({type(base).__name__})")
    if isinstance(spec, PretrainedConfig):
        name = getattr(spec, "name_or_path", "") or spec.model_type
        return architecture_from_config(spec, name=name, source=f"transformers config object ({type(spec).__name__})")
    if not isinstance(spec, (str, os.PathLike)):
        raise PeftpickError(
            f"cannot resolve a model from a {type(spec).__name__}",
            "pass a model name, a local folder or config.json, a hub id, or a transformers PretrainedConfig",
        )
    text = os.fspath(spec).strip()
    if not text:
        raise PeftpickError("no model given", "pass a model name such as llama-3.2-3b (`peftpick models` lists them)")
    # Diffusion denoisers (bundled names, diffusers folders) have their own registry; None: not a denoiser.
    from .denoisers import resolve_denoiser

    denoiser = resolve_denoiser(text, cache=cache if cache is not None else getattr(registry, "cache", None))
    if denoiser is not None:
        return denoiser

    path = Path(text).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise PeftpickError(
                f"folder {path} has no config.json", "pass the folder that holds the model's config.json"
            )
        return _read_local_config(config_file)
    if path.is_file():
        return _read_local_config(path)

    registry = registry if registry is not None else load_registry()
    entry = registry.lookup(text)
    if entry is not None:
        return _architecture_from_entry(entry, cache if cache is not None else registry.cache)
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return _read_hub_config(text, registry)
    if _looks_like_path(text):
        raise PeftpickError(f"no such file or folder: {text}", "check the path to the model folder or its config.json")
    suggestions = registry.closest_names(text)
    hint = f"did you mean {', '.join(suggestions)}? " if suggestions else ""
    raise PeftpickError(
        f"unknown model {text!r}",
        f"{hint}Run `peftpick models` to list them, or pass a local folder with config.json "
        "(or a Hugging Face hub id such as org/name)",
    )


# --------------------------------------------------------------------------------------------- building


def build_config(arch: Architecture, **overrides: Any) -> Any:
    """A transformers config for `arch` with `overrides` applied (e.g. num_hidden_layers=1).

    Overrides may use the modern names (hidden_size, num_hidden_layers, num_attention_heads) for every family;
    they are translated through the config class's attribute map (GPT-2: n_embd, n_layer, n_head). At another
    depth the model keeps its first layers as they are (see `_fit_to_depth`): per-layer lists (layer_types,
    mlp_only_layers, Gemma 3n's intermediate_size and activation_sparsity_pattern) are cut or repeated, the KV-shared
    tail (num_kv_shared_layers) starts after the same number of layers, and `per_layer_config` (keyed by the layer
    indices of `arch`) follows each layer's type.
    """
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    settings = copy.deepcopy(dict(arch.config))  # transformers rewrites nested settings (rope parameters) in place
    model_type = settings.pop("model_type", arch.model_type)
    config_class = _config_class(model_type, f"architecture {arch.name}")
    attribute_map = getattr(config_class, "attribute_map", {}) or {}
    layer_key = attribute_map.get("num_hidden_layers", "num_hidden_layers")
    original_layers = settings.get(layer_key)
    original_types = settings.get("layer_types")
    for key, value in overrides.items():
        settings[attribute_map.get(key, key)] = copy.deepcopy(value)  # nor the caller's lists (Gemma 4's layer_types)
    deeper_or_shallower = layer_key in overrides or "num_hidden_layers" in overrides
    if deeper_or_shallower:
        _fit_to_depth(settings, int(settings[layer_key]), overrides, original_layers, original_types)
    wanted = list(settings["layer_types"]) if isinstance(settings.get("layer_types"), list) else None
    level = hf_logging.get_verbosity()
    if deeper_or_shallower:  # Gemma 4 warns when a cut model's last layer is not full attention (see below)
        hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.for_model(model_type, **settings)
    except (TypeError, ValueError) as error:
        raise PeftpickError(
            f"cannot build a {model_type} config for {arch.name} with {overrides}: {error}",
            "keep the overridden figures consistent (hidden size = heads x head_dim, heads divisible by KV heads)",
        ) from None
    finally:
        hf_logging.set_verbosity(level)
    built = getattr(config, "layer_types", None)
    if deeper_or_shallower and isinstance(wanted, list) and isinstance(built, list) and built != wanted \
            and len(built) == len(wanted):
        # Gemma 4 turns the last layer of any model into a full-attention layer; a model cut to its first layers
        # keeps the types those layers have (layer 0 of Gemma 4 31B is a sliding layer with its own v_proj).
        config.layer_types = list(wanted)
    return config


# Per-layer lists that follow a changed depth, cut or repeated like layer_types.
_PER_LAYER_LISTS = ("intermediate_size", "activation_sparsity_pattern")


def _fit_to_depth(settings: dict[str, Any], layers: int, overrides: Mapping[str, Any], original_layers: Any,
                  original_types: Any) -> None:
    """Adjust `settings` (config keys, overrides applied) in place to `layers` layers: the first layers of the
    original model stay as they were, further layers repeat its pattern."""
    layer_types = settings.get("layer_types")
    if isinstance(layer_types, list) and layer_types and "layer_types" not in overrides:
        # Keep the family's local/global pattern, cut or repeated to the new depth.
        settings["layer_types"] = [layer_types[i % len(layer_types)] for i in range(layers)]
    if isinstance(settings.get("mlp_only_layers"), list) and "mlp_only_layers" not in overrides:
        settings["mlp_only_layers"] = [i for i in settings["mlp_only_layers"] if i < layers]
    for key in _PER_LAYER_LISTS:
        values = settings.get(key)
        if isinstance(values, list) and values and key not in overrides:
            settings[key] = [values[i % len(values)] for i in range(layers)]
    shared = settings.get("num_kv_shared_layers")
    if _whole(shared) and shared > 0 and _whole(original_layers) and "num_kv_shared_layers" not in overrides:
        # The last `shared` layers reuse the keys and values of earlier ones; the layers before them compute their
        # own, and still do at another depth.
        settings["num_kv_shared_layers"] = max(0, layers - max(0, original_layers - shared))
    per_layer = settings.get("per_layer_config")
    if isinstance(per_layer, Mapping) and per_layer:
        settings["per_layer_config"] = _per_layer_config_at(per_layer, original_types, settings.get("layer_types"),
                                                            layers, original_layers)


def _per_layer_config_at(per_layer: Mapping[Any, Any], original_types: Any, layer_types: Any, layers: int,
                         original_layers: Any) -> dict[int, Any]:
    """`per_layer_config` (layer index -> overrides, indices of the original model) for `layers` layers of
    `layer_types`: by layer type where every layer of a type has the same overrides (Gemma 4: head_dim 512 on
    full-attention layers), else by position in the repeated original layers."""
    try:
        by_index = {int(index): dict(values) for index, values in per_layer.items()}
    except (TypeError, ValueError):
        return dict(per_layer)  # not layer indices: transformers says what is wrong with it
    if isinstance(original_types, list) and original_types and isinstance(layer_types, list):
        by_type: dict[str, dict] = {}
        if all(by_type.setdefault(kind, by_index.get(i, {})) == by_index.get(i, {})
               for i, kind in enumerate(original_types)):
            return {i: dict(by_type[kind]) for i, kind in enumerate(layer_types[:layers]) if by_type.get(kind)}
    period = original_layers if _whole(original_layers) and original_layers > 0 else max(by_index) + 1
    return {i: dict(by_index[i % period]) for i in range(layers) if i % period in by_index}


def tiny_overrides(arch: Architecture, hidden_size: int = 64, num_heads: int = 4, num_layers: int = 1,
                   vocab_size: int = 128) -> dict[str, Any]:
    """Overrides that shrink `arch` to a few thousand parameters while keeping its layout.

    The result keeps the family's module names, GQA grouping (as far as `num_heads` allows), fused projections and
    expert structure, so tests and probes can build real weights on CPU in milliseconds.
    """
    config = arch.config
    group = max(1, arch.num_heads // max(1, arch.num_kv_heads))
    kv_heads = num_heads // group if group <= num_heads and num_heads % group == 0 else 1
    head_dim = hidden_size // num_heads
    overrides: dict[str, Any] = {
        "hidden_size": hidden_size,
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "vocab_size": vocab_size,
    }
    if "num_key_value_heads" in config:
        overrides["num_key_value_heads"] = kv_heads
    if config.get("head_dim") is not None:
        overrides["head_dim"] = head_dim
    if config.get("query_pre_attn_scalar") is not None:
        overrides["query_pre_attn_scalar"] = head_dim
    if config.get("intermediate_size") is not None:
        overrides["intermediate_size"] = 2 * hidden_size
    if config.get("n_inner") is not None:
        overrides["n_inner"] = 4 * hidden_size
    if config.get("moe_intermediate_size") is not None:
        overrides["moe_intermediate_size"] = hidden_size // 2
    for key in _EXPERT_COUNT_KEYS:
        if config.get(key):
            overrides[key] = min(int(config[key]), 4)
    for key in _EXPERTS_PER_TOKEN_KEYS:
        if config.get(key):
            overrides[key] = min(int(config[key]), 2)
    # Per-layer embeddings (Gemma 3n, Gemma 4 E2B / E4B): a vocabulary x (layers x width) table of their own.
    if config.get("hidden_size_per_layer_input"):
        overrides["hidden_size_per_layer_input"] = max(1, hidden_size // 4)
    if config.get("vocab_size_per_layer_input"):
        overrides["vocab_size_per_layer_input"] = vocab_size
    if config.get("laurel_rank"):
        overrides["laurel_rank"] = max(1, hidden_size // 8)
    per_layer = config.get("per_layer_config")
    if isinstance(per_layer, Mapping) and per_layer:
        overrides["per_layer_config"] = {
            index: _tiny_layer_overrides(values, arch, head_dim, num_heads) for index, values in per_layer.items()
        }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, int) and v >= vocab_size for v in values):
            overrides[key] = None  # ids from the real vocabulary would index past the shrunk embedding
    return overrides


def _tiny_layer_overrides(values: Any, arch: Architecture, head_dim: int, num_heads: int) -> Any:
    """One layer's `per_layer_config` overrides, shrunk like the global figures (head widths keep their ratio to
    the global head_dim, KV heads their grouping)."""
    if not isinstance(values, Mapping):
        return values
    shrunk = dict(values)
    if _whole(shrunk.get("head_dim")) and arch.head_dim:
        shrunk["head_dim"] = max(1, head_dim * shrunk["head_dim"] // arch.head_dim)
    if _whole(shrunk.get("num_key_value_heads")) and shrunk["num_key_value_heads"] > 0:
        group = max(1, arch.num_heads // shrunk["num_key_value_heads"])
        shrunk["num_key_value_heads"] = num_heads // group if group <= num_heads and num_heads % group == 0 else 1
    return shrunk


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise PeftpickError(f"unknown dtype {dtype!r}", "use bfloat16, float16 or float32")
    return value


def build_model(arch: Architecture, device: Any = "meta", dtype: Any = None, num_layers: int | None = None,
                **overrides: Any) -> Any:
    """`AutoModelForCausalLM.from_config` for `arch`, on the meta device by default (no memory, fast).

    `num_layers` keeps the family's layer pattern at another depth; other `overrides` go to `build_config`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if num_layers is not None:
        overrides["num_hidden_layers"] = num_layers
    config = build_config(arch, **overrides)
    on_meta = torch.device(device).type == "meta"
    with torch.device(device), _skip_init_on_meta(on_meta):
        model = AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype or arch.dtype))
    if on_meta:
        model.tie_weights()  # skipping init also skipped the tying that init_weights does
    return model


def skip_weight_init() -> Any:
    """A context that skips random weight initialisation (meta builds: no values to fill, half the build time).
    Call model.tie_weights() afterwards: initialisation is also where transformers ties embeddings."""
    return _skip_init_on_meta(True)


def _skip_init_on_meta(on_meta: bool) -> Any:
    if not on_meta:
        return contextlib.nullcontext()
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # an internal of transformers 5; without it the build is only slower
        return contextlib.nullcontext()
    return no_init_weights()


def count_parameters(arch: Architecture) -> int:
    """Parameters of the full model (tied embeddings counted once), from a meta-device build."""
    if "parameter_count" in arch.facts:
        return int(arch.facts["parameter_count"])
    model = build_model(arch, device="meta")
    return sum(parameter.numel() for parameter in model.parameters())
