"""Folding an adapter into its base model (PEFT's merge_and_unload) and saving a plain model folder.

This is the "merge into the base first" route of a serving verdict: the result loads in any engine as an ordinary
model, at the cost of one full copy of the weights per adapter.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftpick.adapters.convert import method_label
from peftpick.adapters.files import read_adapter
from peftpick.errors import PeftpickError
from peftpick.knowledge.serving import rewriting_init

Progress = Callable[[str], None]
# Files of a model folder besides the weights that a served model needs (tokenizer, chat template).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "added_tokens.json")


@dataclass(frozen=True)
class Merge:
    source: Path
    output: Path
    base: str
    from_method: str
    layers_merged: int
    output_bytes: int
    copied_files: tuple[str, ...]
    notes: tuple[str, ...] = ()


def merge_adapter(path: Path | str, base: str | None, output: Path | str, *, dtype: str | None = None,
                  progress: Progress | None = None, kb: Any = None) -> Merge:
    """Merge the adapter at `path` into `base` and write the merged model (safetensors) to `output`."""
    from peftpick.adapters.convert import _capabilities, _prepare_output, _quiet, _tuner_layers
    from peftpick.adapters.models import base_spec, load_adapter_model, load_base

    say = progress or (lambda _message: None)
    adapter = read_adapter(path)
    out = _prepare_output(Path(output), adapter.path)
    label = method_label(adapter.config)
    caps = _capabilities(adapter.peft_type, kb)
    if caps is None or not caps.merging:
        why = ("learns virtual tokens, which are not a change of the weights" if caps is not None and
               not caps.wraps_layers else "has no merge in PEFT (merge_and_unload)")
        raise PeftpickError(f"{label} adapters cannot be merged into the base: the method {why}",
                            "serve it with PEFT itself (PeftModel.from_pretrained), or retrain as LoRA "
                            "(peftpick --methods lora ... gives its settings)")
    notes = []
    family = rewriting_init(adapter.config) if adapter.peft_type == "LORA" else None
    init = adapter.config.get("init_lora_weights")
    if family is not None and not (family == "olora" or init == "pissa"):
        raise PeftpickError(f"{label} (init_lora_weights={init!r}) rewrites the base weights in a way PEFT cannot "
                            "recompute from the original base when it loads the adapter",
                            "merge into the rewritten base that was saved with the adapter, or convert it with "
                            "--initial-adapter (peftpick convert --help)")
    if family is not None:
        notes.append(f"PEFT recomputes the {label} residual of the base weights when it loads the adapter, so the "
                     "merge is onto the original base")
    spec = base_spec(adapter, base, "merge")
    say(f"loading the base model {spec}")
    model, arch = load_base(spec, adapter, dtype)
    with _quiet():
        peft_model = load_adapter_model(model, adapter)
    layers = len(_tuner_layers(peft_model))
    say(f"merging {layers} adapted layers (merge_and_unload)")
    try:
        with _quiet():
            merged = peft_model.merge_and_unload(safe_merge=True)
    except (ValueError, RuntimeError, NotImplementedError) as error:
        raise PeftpickError(f"PEFT cannot merge {adapter.path} into {spec}: {' '.join(str(error).split())[:300]}",
                            "retrain without the option PEFT names, or serve the adapter with PEFT itself") from None
    say(f"writing {out}")
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    copied = []
    folder = Path(arch.local_path) if arch.local_path else None
    if folder is not None:
        for name in _TOKENIZER_FILES:
            if (folder / name).is_file() and not (out / name).exists():
                shutil.copyfile(folder / name, out / name)
                copied.append(name)
    if not copied:
        notes.append("no tokenizer files were next to the base weights: copy the tokenizer into the folder before "
                     "serving it")
    size = sum(file.stat().st_size for file in out.glob("*.safetensors"))
    return Merge(adapter.path, out, spec, label, layers, size, tuple(copied), tuple(notes))
