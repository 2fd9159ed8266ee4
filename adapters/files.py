"""Reading a saved PEFT adapter without loading its tensors: adapter_config.json and the weights file's header.

`read_adapter(folder)` gives a `SavedAdapter`: the config as written (checked field by field against the installed
PEFT config class's annotations, so `"r": "sixteen"` is one clear error and not a TypeError deep inside PEFT), and
the name, dtype and shape of every saved tensor, read from the safetensors header (8 bytes of length, then JSON).
Nothing here imports torch for a safetensors file.
"""

from __future__ import annotations

import json
import re
import struct
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from peftpick.errors import PeftpickError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# safetensors caps its own header at 100 MB; a larger length field means a damaged or foreign file.
_MAX_HEADER_BYTES = 100_000_000
# Whole numbers beyond this are typos or fuzz, not settings (no layer is 2**31 wide).
_MAX_INT = 2**31 - 1
_SAFETENSORS_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
                       "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}
# Fields that PEFT writes as floats although the class annotates them as int (save_pretrained multiplies
# lora_alpha by sqrt(2) when it converts an rsLoRA PiSSA adapter, for instance).
_SCALE_FIELDS = re.compile(r"(^|_)alpha($|_)")
_SAVE_HINT = "re-save the adapter with PEFT's save_pretrained, or fix the value by hand"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        total = 1
        for size in self.shape:
            total *= size
        return total


@dataclass(frozen=True)
class SavedAdapter:
    """A PEFT adapter folder as saved: its config (raw JSON, validated) and its tensors' names, dtypes and shapes."""

    path: Path
    config: Mapping[str, Any]
    peft_type: str
    config_class: str
    tensors: tuple[TensorInfo, ...]
    weights_file: Path | None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None

    def tensor_kinds(self) -> dict[str, list[str]]:
        """Saved tensors grouped by what they are: "lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A",
        "bias", "other" (a full copy of a module: modules_to_save, trainable tokens), keyed to module paths."""
        kinds: dict[str, list[str]] = {}
        for tensor in self.tensors:
            kind, module = split_tensor_name(tensor.name)
            kinds.setdefault(kind, []).append(module)
        return kinds

    def lora_ranks(self) -> dict[str, int]:
        """Module path -> rank, from the shapes of its lora_A (or lora_embedding_A) tensor."""
        ranks = {}
        for tensor in self.tensors:
            kind, module = split_tensor_name(tensor.name)
            if kind == "lora_A" and len(tensor.shape) >= 2:
                ranks[module] = tensor.shape[0]
            elif kind == "lora_embedding_A" and len(tensor.shape) == 2:
                ranks[module] = tensor.shape[0]
        return ranks

    @property
    def saved_bytes(self) -> int:
        return self.weights_file.stat().st_size if self.weights_file is not None else 0


_LORA_PART = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.[^.]+)?"
                        r"(\.weight)?$")


def split_tensor_name(name: str) -> tuple[str, str]:
    """("lora_A", "model.layers.0.self_attn.q_proj") for a saved tensor name; ("other", name) for the rest."""
    stripped = name.removeprefix("base_model.model.")
    match = _LORA_PART.search(stripped)
    if match:
        return match.group(1), stripped[:match.start()]
    if stripped.endswith(".lora_B.bias") or stripped.endswith(".bias") and ".lora_" in stripped:
        return "bias", stripped.rsplit(".lora_", 1)[0]
    return "other", stripped


# ---------------------------------------------------------------------------------------------- config


def read_adapter_config(path: Path | str) -> tuple[dict[str, Any], Any]:
    """(the config as written, the peft.PeftConfig built from it) for adapter_config.json or its folder.

    Every field is checked against the PEFT config class's annotations first; a bad value is a PeftpickError
    naming the field, what it holds and what it should hold.
    """
    import warnings

    import peft

    file = Path(path)
    file = file / CONFIG_NAME if file.is_dir() else file
    if not file.is_file():
        where = "folder" if file.name == CONFIG_NAME and not file.parent.is_dir() else "file"
        raise PeftpickError(f"no adapter config at {file}" + (" (the folder does not exist)" if where == "folder" else ""),
                            "pass a PEFT adapter folder (with adapter_config.json) or the adapter_config.json file")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PeftpickError(f"{file} is not text", "pass the adapter_config.json that PEFT's save_pretrained writes") \
            from None
    except json.JSONDecodeError as error:
        raise PeftpickError(f"{file} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})",
                            "the file may be truncated; re-save the adapter with PEFT's save_pretrained") from None
    except (ValueError, RecursionError) as error:  # a number too long for int(), nesting too deep
        reason = ' '.join(str(error).split(';')[0].split())[:160]
        raise PeftpickError(f"{file} cannot be read as JSON ({reason})",
                            "re-save the adapter with PEFT's save_pretrained") from None
    except OSError as error:
        raise PeftpickError(f"cannot read {file} ({error.strerror or error})", "check the file's permissions") \
            from None
    if not isinstance(raw, dict):
        raise PeftpickError(f"{file} holds a JSON {type(raw).__name__}, not an object",
                            "pass the adapter_config.json that PEFT's save_pretrained writes")
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise PeftpickError(f"{file} has no peft_type", "it must be an adapter_config.json written by PEFT's "
                            "save_pretrained (with e.g. \"peft_type\": \"LORA\")")
    known = {member.value for member in peft.PeftType}
    if peft_type.upper() not in known:
        raise PeftpickError(f"{file}: peft_type {peft_type!r} is not a PEFT method that peft {peft.__version__} knows",
                            "upgrade peft if a newer version saved it, or fix peft_type "
                            f"(e.g. LORA, IA3, OFT, LOHA, LOKR)")
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type.upper()]
    check_config_fields(config_class, raw, str(file))
    kwargs = {k: v for k, v in raw.items() if k not in ("auto_mapping", "base_model_name_or_path", "revision")}
    kwargs["peft_type"] = peft_type.upper()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys from newer PEFT versions: PEFT ignores them, so do we
            config = peft.PeftConfig.from_peft_type(**kwargs)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        message = " ".join(str(error).split())
        raise PeftpickError(f"{file} is not a valid {config_class.__name__}: {message}", _SAVE_HINT) from None
    return raw, config


def check_config_fields(config_class: type, raw: Mapping[str, Any], where: str) -> None:
    """Each known field of `raw` against `config_class`'s type annotation (unknown keys are left to PEFT)."""
    import dataclasses

    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # an annotation the running Python cannot resolve: leave the checking to PEFT
        return
    fields = dataclasses.fields(config_class)
    names = {f.name for f in fields}
    # null where the class's default is None means "use PEFT's default" (AdaptionPrompt's target_modules is
    # annotated str, default None, and saved as null)
    null_default = {f.name for f in fields if f.default is None}
    for key, value in raw.items():
        if key not in names or key not in hints or (value is None and key in null_default):
            continue
        expected = hints[key]
        if not _matches(value, expected, allow_float=bool(_SCALE_FIELDS.search(key))):
            raise PeftpickError(f"{where}: {key} is {_short(value)}, expected {_describe(expected)}", _SAVE_HINT)
    for key in ("r", "lora_alpha", "alpha", "num_virtual_tokens", "oft_block_size", "boft_block_size"):
        value = raw.get(key)
        if key in names and _is_number(value) and not 0 < value <= _MAX_INT and not (key == "oft_block_size" and value == 0):
            raise PeftpickError(f"{where}: {key} is {_short(value)}, expected a positive number up to {_MAX_INT}",
                                _SAVE_HINT)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or value == value else "NaN"
    return text if len(text) <= 60 else text[:57] + "..."


def _literal_matches(value: Any, allowed: tuple[Any, ...]) -> bool:
    for option in allowed:
        if value == option and type(value) is type(option):
            return True
        # PEFT spells families of values with a placeholder: 'pissa_niter_[number of iters]'
        if isinstance(option, str) and isinstance(value, str) and "[" in option:
            prefix = option.split("[", 1)[0]
            if value.startswith(prefix) and value[len(prefix):].isdigit():
                return True
    return False


def _matches(value: Any, expected: Any, allow_float: bool = False) -> bool:
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if expected is Any or expected is object:
        return True
    if expected is type(None):
        return value is None
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_matches(value, arg, allow_float) for arg in args)
    if origin is typing.Literal:
        return _literal_matches(value, args)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        if isinstance(value, bool):
            return False
        if isinstance(value, int):
            return abs(value) <= _MAX_INT
        return allow_float and isinstance(value, float) and value == value and abs(value) <= _MAX_INT
    if expected is float:
        return _is_number(value) and value == value and abs(value) <= 1e12
    if expected is str:
        return isinstance(value, str)
    if isinstance(expected, type) and issubclass(expected, Enum):
        return isinstance(value, str) and value in {m.value for m in expected} | {m.name for m in expected}
    if origin in (list, tuple, set, frozenset) or expected in (list, tuple, set):
        if not isinstance(value, list):
            return False
        if not args:
            return True
        if origin is tuple and len(args) > 1 and args[1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(item, args[0]) for item in value)
    if origin is dict or expected is dict:
        if not isinstance(value, dict):
            return False
        if len(args) == 2:
            return all(_matches(v, args[1]) for v in value.values())
        return True
    # a nested config class (LoftQConfig, EvaConfig ...) is written as a JSON object
    if isinstance(expected, type):
        return isinstance(value, (dict, expected))
    return True


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if expected is type(None):
        return "null"
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        words = sorted(dict.fromkeys(_describe(arg) for arg in args), key=lambda w: (w == "null", len(w)))
        return " or ".join(words)
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if expected is bool:
        return "true or false"
    if expected is int:
        return "a whole number"
    if expected is float:
        return "a number"
    if expected is str:
        return "a string"
    if isinstance(expected, type) and issubclass(expected, Enum):
        return "one of " + ", ".join(json.dumps(m.value) for m in expected)
    if origin in (list, tuple, set) or expected in (list, tuple, set):
        if not args:
            return "a list"
        inner = _describe(args[0])
        return "a list of " + (inner.split(" ", 1)[1] + "s" if inner.startswith(("a ", "an ")) else inner)
    if origin is dict or expected is dict:
        return "an object"
    return "an object" if isinstance(expected, type) else str(expected)


# ---------------------------------------------------------------------------------------------- weights


def read_safetensors_header(file: Path) -> tuple[tuple[TensorInfo, ...], dict[str, str]]:
    """(tensors, metadata) from a safetensors file's header; no tensor data is read."""
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise PeftpickError(f"{file} is too short to be a safetensors file ({size} bytes)",
                                    "the file is truncated; re-save the adapter")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(_MAX_HEADER_BYTES, size - 8):
                raise PeftpickError(f"{file} is not a safetensors file (its header claims {length:,} bytes of a "
                                    f"{size:,}-byte file)", "the file is truncated or damaged; re-save the adapter")
            header_bytes = handle.read(length)
    except OSError as error:
        raise PeftpickError(f"cannot read {file} ({error.strerror or error})", "check the file's permissions") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PeftpickError(f"{file} has an unreadable safetensors header", "the file is damaged; re-save the adapter") \
            from None
    if not isinstance(header, dict):
        raise PeftpickError(f"{file} has a malformed safetensors header", "the file is damaged; re-save the adapter")
    metadata = header.pop("__metadata__", None) or {}
    tensors = []
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry["shape"])
                and len(entry["data_offsets"]) == 2
                and all(isinstance(n, int) and 0 <= n <= data_bytes for n in entry["data_offsets"])):
            raise PeftpickError(f"{file}: the header entry of tensor {name!r} is malformed or points past the end "
                                "of the file", "the file is truncated or damaged; re-save the adapter")
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise PeftpickError(f"{file}: tensor {name!r} has unknown dtype {entry['dtype']!r}",
                                "the file is damaged, or written by a newer safetensors; re-save the adapter")
        tensors.append(TensorInfo(name, entry["dtype"], tuple(entry["shape"])))
    return tuple(tensors), {str(k): str(v) for k, v in dict(metadata).items()} if isinstance(metadata, dict) else {}


def _read_pickle_header(file: Path) -> tuple[TensorInfo, ...]:
    """Names, dtypes and shapes of a torch-saved state dict, loaded onto the meta device (no data)."""
    import torch

    try:
        state = torch.load(file, map_location="meta", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for damaged pickles
        raise PeftpickError(f"cannot read {file} as a torch state dict ({type(error).__name__})",
                            "the file is damaged; re-save the adapter (PEFT writes safetensors by default)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PeftpickError(f"{file} is not a state dict of tensors", "re-save the adapter with PEFT's save_pretrained")
    return tuple(TensorInfo(str(name), str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in state.items())


def read_adapter(path: Path | str) -> SavedAdapter:
    """The adapter folder at `path`: validated config and tensor headers. PeftpickError for anything unreadable."""
    folder = Path(path)
    if not folder.exists():
        raise PeftpickError(f"no adapter folder at {folder}", "pass the folder PEFT's save_pretrained wrote")
    if not folder.is_dir():
        raise PeftpickError(f"{folder} is a file, not an adapter folder",
                            "pass the folder that holds adapter_config.json and adapter_model.safetensors")
    raw, config = read_adapter_config(folder)
    safetensors_file, pickle_file = folder / SAFETENSORS_NAME, folder / PICKLE_NAME
    metadata: dict[str, str] = {}
    if safetensors_file.is_file():
        tensors, metadata = read_safetensors_header(safetensors_file)
        weights: Path | None = safetensors_file
    elif pickle_file.is_file():
        tensors, weights = _read_pickle_header(pickle_file), pickle_file
    else:
        raise PeftpickError(f"{folder} has no adapter weights ({SAFETENSORS_NAME} or {PICKLE_NAME})",
                            "save the trained adapter with model.save_pretrained(folder)")
    if not tensors:
        raise PeftpickError(f"{weights} holds no tensors", "save the trained adapter with model.save_pretrained(folder)")
    return SavedAdapter(path=folder, config=raw, peft_type=str(raw["peft_type"]).upper(),
                        config_class=type(config).__name__, tensors=tensors, weights_file=weights, metadata=metadata)
