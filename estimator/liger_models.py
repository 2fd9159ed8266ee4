"""Which model types Liger's fused cross-entropy patches, without importing torch or Liger (the recommender asks
before anything is traced)."""

from __future__ import annotations

import functools

# liger-kernel 0.8.5 transformers/monkey_patch.py MODEL_TYPE_TO_APPLY_LIGER_FN, used when liger is not installed
LIGER_MODEL_TYPES_0_8_5 = frozenset({
    "deepseek_v2", "deepseek_v3", "deepseek_v4", "exaone4", "falcon_h1", "gemma", "gemma2", "gemma3", "gemma3_text",
    "gemma4", "gemma4_text", "glm4", "glm4v", "glm4v_moe", "gpt_oss", "granite", "hunyuan_v1_dense", "hunyuan_v1_moe",
    "internvl", "llama", "llama4", "llama4_text", "llava", "ministral", "mistral", "mixtral", "mllama",
    "mllama_text_model", "muse_glimmer", "nemotron", "olmo2", "olmo3", "paligemma", "phi3", "pixtral", "qwen2",
    "qwen2_5_vl", "qwen2_5_vl_text", "qwen2_vl", "qwen2_vl_text", "qwen3", "qwen3_5", "qwen3_5_moe",
    "qwen3_5_moe_text", "qwen3_5_text", "qwen3_moe", "qwen3_next", "qwen3_vl", "qwen3_vl_moe", "qwen3_vl_moe_text",
    "qwen3_vl_text", "smollm3", "smolvlm",
})


def liger_model_types() -> tuple[frozenset[str], str]:
    """Model types Liger patches, and where the list comes from: the installed package's
    MODEL_TYPE_TO_APPLY_LIGER_FN, read from its source file (importing it pulls in Triton, about 8 s), or the
    0.8.5 list when liger-kernel is not installed."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("liger_kernel")
        installed = version("liger-kernel")
    except (ImportError, PackageNotFoundError, ValueError):
        spec, installed = None, None
    if spec is not None and spec.submodule_search_locations:
        source = Path(next(iter(spec.submodule_search_locations))) / "transformers" / "monkey_patch.py"
        try:
            keys = _types_in_source(str(source), source.stat().st_mtime_ns)
        except OSError:
            keys = None
        if keys is not None:
            return keys, f"liger-kernel {installed} (installed)"
    return LIGER_MODEL_TYPES_0_8_5, "liger-kernel 0.8.5 monkey_patch.py (not installed)"


@functools.lru_cache(maxsize=4)
def _types_in_source(path: str, _modified_ns: int) -> frozenset[str] | None:
    """The keys of MODEL_TYPE_TO_APPLY_LIGER_FN in the file at `path` (None: not found). Parsing it takes about
    70 ms and every estimate asks, so the answer is kept per file and modification time."""
    import ast
    from pathlib import Path

    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError):
        return None
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if (isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict)
                and any(getattr(t, "id", None) == "MODEL_TYPE_TO_APPLY_LIGER_FN" for t in targets)):
            return frozenset(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return None
