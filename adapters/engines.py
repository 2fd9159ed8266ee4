"""The engines' own word on an adapter, where the engine is installed here.

vLLM ships the code that decides whether it loads an adapter: `PEFTHelper.validate_legal` (config features and
the rank against `max_lora_rank`) and `LoRAModel.from_local_checkpoint` (tensor names against the modules the
model can adapt). `validate_with_engine` runs both in a child process (importing vLLM takes seconds, sets up its
own logging and may start threads), with no GPU and no engine start, and returns the engine's verdict and words.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from peftpick.adapters.files import SavedAdapter

_TIMEOUT_S = 300


@dataclass(frozen=True)
class EngineVerdict:
    engine: str  # "vLLM 0.32.0"
    accepts: bool
    message: str  # the engine's own error text when it refuses
    checked: str  # what ran, e.g. "PEFTHelper.validate_legal(max_lora_rank=64) + LoRAModel.from_local_checkpoint"


# Runs inside the engine's environment: vLLM's own checks, in the order its worker applies them when it loads
# an adapter (vllm/lora/worker_manager.py: PEFTHelper.from_local_dir, validate_legal, then
# LoRAModel.from_local_checkpoint with the model's supported modules).
_VLLM_CHECK = r"""
import json, os, sys
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
path, max_rank, base = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {"version": None, "accepts": False, "message": "", "checked": ""}


def expected_modules(model_dir):
    # What vllm/lora/worker_manager.py builds from the live model, without starting it: the suffixes of the
    # model's linear layers (vLLM wraps every LinearBase; HF's unpacked names equal vLLM's packed children),
    # the vLLM class's embedding modules, and the packed names' children.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from vllm.model_executor.models import ModelRegistry

    config = AutoConfig.from_pretrained(model_dir)
    model_cls = ModelRegistry._try_load_model_cls(config.architectures[0])
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    linear = {n.rsplit(".", 1)[-1] for n, m in hf_model.named_modules() if isinstance(m, torch.nn.Linear)}
    linear.discard("lm_head")
    expected = set(linear)
    for parent, children in (getattr(model_cls, "packed_modules_mapping", {}) or {}).items():
        expected.discard(parent)
        if parent in linear or any(child in linear for child in children):
            expected.update(children)
    expected.update((getattr(model_cls, "embedding_modules", {}) or {}).keys())
    return expected, config.vocab_size, getattr(config, "max_position_embeddings", None)


try:
    import vllm
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    out["version"] = vllm.__version__
    modules, vocab, positions = (expected_modules(base) if base else (None, None, None))
    helper = PEFTHelper.from_local_dir(path, positions)
    out["checked"] = f"PEFTHelper.validate_legal(max_lora_rank={max_rank})"
    helper.validate_legal(LoRAConfig(max_lora_rank=max_rank))
    if modules is not None:
        import torch
        from vllm.lora.lora_model import LoRAModel
        out["checked"] += " + LoRAModel.from_local_checkpoint (the model's LoRA modules)"
        LoRAModel.from_local_checkpoint(path, modules, peft_helper=helper, lora_model_id=1, device="cpu",
                                        dtype=torch.bfloat16, model_vocab_size=vocab)
    out["accepts"] = True
except Exception as error:  # the engine's refusal, in its own words
    out["message"] = " ".join(f"{type(error).__name__}: {error}".split())
print("PEFTPICK-RESULT " + json.dumps(out))
"""


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def validate_with_engine(stack: str, adapter: SavedAdapter, rank_limit: int,
                         base_dir: str | None = None) -> EngineVerdict | None:
    """The installed engine's own verdict on `adapter`, or None when the engine has no offline validator here.

    rank_limit: the engine's rank setting to validate against (vLLM's --max-lora-rank); base_dir: the base model's
    folder, for the tensor check against the modules the model can adapt (without it, only the config checks run).
    """
    if stack != "vllm" or not vllm_importable():
        return None
    try:
        done = subprocess.run([sys.executable, "-c", _VLLM_CHECK, str(adapter.path), str(rank_limit), base_dir or ""],
                              capture_output=True, text=True, timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None
    line = next((row for row in done.stdout.splitlines() if row.startswith("PEFTPICK-RESULT ")), None)
    if line is None:
        return None
    result: dict[str, Any] = json.loads(line.removeprefix("PEFTPICK-RESULT "))
    if result.get("version") is None:
        return None
    return EngineVerdict(f"vLLM {result['version']}", bool(result["accepts"]), str(result.get("message") or ""),
                         str(result.get("checked") or ""))
