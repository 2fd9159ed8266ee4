"""Loading the base model an adapter belongs to, and the adapter onto it, for conversion and merging.

The base is what `--base` names (a local folder with weights, a hub id in the local cache, or a registry name
whose weights are cached), or the adapter's own `base_model_name_or_path` when that is a local folder. The
task head follows the adapter's `task_type` (causal LM unless it says otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftpick.adapters.files import SavedAdapter
from peftpick.errors import PeftpickError

_AUTO_CLASSES = {
    None: "AutoModelForCausalLM",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def base_spec(adapter: SavedAdapter, base: str | None, command: str) -> str:
    """What to load as the base model: `base`, else the adapter's base_model_name_or_path if it is a local folder."""
    if base:
        return base
    named = adapter.base_model
    if named and Path(named).is_dir():
        return named
    named_words = f" (its adapter_config.json names {named!r}, which is not a folder here)" if named else ""
    raise PeftpickError(f"{command} needs the base model's weights{named_words}",
                        f"pass --base with the model folder or hub id, e.g. peftpick {command} "
                        f"{adapter.path} --base ./my-model ...")


def load_base(spec: str, adapter: SavedAdapter, dtype: str | None = None) -> tuple[Any, Any]:
    """(the base model on the CPU, its Architecture). dtype None: the checkpoint's own."""
    import torch
    import transformers

    from peftpick.knowledge.architectures import resolve_model
    from peftpick.probes.runner import weights_source

    arch = resolve_model(spec)
    source, local_only = weights_source(arch, random_weights=False)
    task = adapter.config.get("task_type")
    class_name = _AUTO_CLASSES.get(str(task).upper() if task else None)
    if class_name is None:
        raise PeftpickError(f"{adapter.path}: task_type {task!r} is not one peftpick can load",
                            f"use an adapter of one of: {', '.join(str(t) for t in _AUTO_CLASSES if t)}")
    auto_class = getattr(transformers, class_name)
    kwargs: dict[str, Any] = {"local_files_only": local_only}
    kwargs["dtype"] = getattr(torch, dtype) if dtype else "auto"
    if class_name == "AutoModelForSequenceClassification":
        labels = _num_labels(adapter)
        if labels:
            kwargs["num_labels"] = labels
    try:
        model = auto_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise PeftpickError(f"cannot load the base model from {source}: {' '.join(str(error).split())[:300]}",
                            "pass --base with a folder that holds config.json and the weights") from None
    return model, arch


def _num_labels(adapter: SavedAdapter) -> int | None:
    """Number of labels of a classification head saved in modules_to_save (its out_features)."""
    for tensor in adapter.tensors:
        name = tensor.name
        if (name.endswith("score.weight") or name.endswith("classifier.weight")) and len(tensor.shape) == 2:
            return tensor.shape[0]
    return None


def load_adapter_model(base_model: Any, adapter: SavedAdapter, adapter_name: str = "default") -> Any:
    """A PeftModel of `adapter` on `base_model` (PEFT's own loader), with a clear error for a mismatch."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base_model, str(adapter.path), adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as error:
        message = " ".join(str(error).split())
        if "size mismatch" in message or "shape" in message:
            raise PeftpickError(f"{adapter.path} was trained for another architecture than the base given "
                                f"({message[:200]})", "pass the base model the adapter was trained on") from None
        raise PeftpickError(f"PEFT cannot load {adapter.path} onto the base: {message[:300]}",
                            "pass the base model the adapter was trained on") from None
