"""Malformed input to `peftpick estimate`: broken adapter_config.json and config.json files each give one line
starting with "error:" and exit code 2, never a traceback; PEFT methods the meta-device trace cannot run are
refused the same way, and the ones it can run (after `estimator.training`'s stand-ins) count their trainable
parameters as PEFT does on a real model.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftpick.cli import app

TINY_MODEL = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
}
LORA = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
SHAPE = ["--batch-size", "1", "--seq-len", "16"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_MODEL))
    return folder


def _write(folder: Path, name: str, content: object) -> Path:
    file = folder / name
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif isinstance(content, str):
        file.write_text(content)
    else:  # json.dumps writes NaN / Infinity as Python's json reads them
        file.write_text(json.dumps(content))
    return file


def _estimate(*args: str):
    return CliRunner().invoke(app, ["estimate", *args, *SHAPE])


def _assert_one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_the_valid_inputs_used_below_are_estimated(tmp_path, tiny_model):
    adapter = _write(tmp_path, "adapter_config.json", LORA)
    result = _estimate("--model", str(tiny_model), "--adapter-config", str(adapter), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["trainable_params"] == 6 * 8 * ((64 + 64) + (64 + 32))


# ------------------------------------------------------------------------------------- adapter_config.json

MALFORMED_FILES = {
    "truncated JSON": json.dumps(LORA)[:-9],
    "empty file": "",
    "only whitespace": "  \n",
    "a list": [LORA],
    "a string": "\"LORA\"",
    "null": "null",
    "non-UTF-8 bytes": b"\xff\xfe{\"peft_type\": \"LORA\"\x80}",
    "nested too deep": "[" * 100_000 + "]" * 100_000,
    "a number too long to read": '{"peft_type": "LORA", "r": ' + "9" * 5000 + "}",
}

ADAPTER_CHANGES = {
    "no peft_type": {"peft_type": None},
    "peft_type a number": {"peft_type": 5},
    "unknown peft_type": {"peft_type": "NOT_A_METHOD"},
    "r as string": {"r": "8"},
    "r = 10**12": {"r": 10**12},
    "r = 10**6 (beyond the widest layer)": {"r": 10**6},
    "r negative": {"r": -3},
    "r zero": {"r": 0},
    "r NaN": {"r": float("nan")},
    "r Infinity": {"r": float("inf")},
    "r fractional": {"r": 8.5},
    "r true": {"r": True},
    "lora_alpha as list": {"lora_alpha": [16]},
    "lora_alpha -Infinity": {"lora_alpha": float("-inf")},
    "lora_dropout NaN": {"lora_dropout": float("nan")},
    "lora_dropout = 10**300": {"lora_dropout": 10**300},
    "target_modules as int": {"target_modules": 5},
    "target_modules list of ints": {"target_modules": [1, 2]},
    "target_modules missing from the model": {"target_modules": ["query_key_value"]},
    "rank_pattern huge": {"rank_pattern": {"q_proj": 10**9}},
    "layers_to_transform as string": {"layers_to_transform": "all"},
}

OTHER_METHODS = {
    "prompt tuning: 10**9 virtual tokens": {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                                            "num_virtual_tokens": 10**9},
    "prompt tuning: token_dim 10**9": {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                                       "num_virtual_tokens": 8, "token_dim": 10**9},
    "FourierFT: n_frequency 10**10": {"peft_type": "FOURIERFT", "task_type": "CAUSAL_LM", "n_frequency": 10**10,
                                      "target_modules": ["q_proj"]},
    "VB-LoRA: 10**9 vectors": {"peft_type": "VBLORA", "task_type": "CAUSAL_LM", "num_vectors": 10**9,
                               "vector_length": 16, "target_modules": ["q_proj"]},
    "AdaptionPrompt: more layers than the model": {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM",
                                                   "adapter_layers": 40, "adapter_len": 10},
    "AdaptionPrompt: no adapter_len": {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM",
                                       "adapter_layers": 2},
}


def _lora_with(change: dict) -> dict:
    config = {**LORA, **change}
    return {k: v for k, v in config.items() if v is not None}


def _wrong_value(annotation: object) -> object:
    """A JSON value that does not fit a field: a number where text (or a list of text) goes, text elsewhere
    (ints, floats, bools, literals, objects, lists of numbers)."""
    return 12345 if "str" in str(annotation) else "not-a-valid-value"


def _lora_fields() -> list[str]:
    from peft import LoraConfig

    hints = typing.get_type_hints(LoraConfig)
    return [f.name for f in dataclasses.fields(LoraConfig) if hints.get(f.name) not in (None, typing.Any)]


@pytest.mark.parametrize("content", MALFORMED_FILES.values(), ids=MALFORMED_FILES.keys())
def test_unreadable_adapter_configs_give_one_line(tmp_path, tiny_model, content):
    adapter = _write(tmp_path, "adapter_config.json", content)
    line = _assert_one_error_line(_estimate("--model", str(tiny_model), "--adapter-config", str(adapter)))
    assert "adapter_config.json" in line


@pytest.mark.parametrize("change", ADAPTER_CHANGES.values(), ids=ADAPTER_CHANGES.keys())
def test_bad_lora_fields_give_one_line(tmp_path, tiny_model, change):
    adapter = _write(tmp_path, "adapter_config.json", _lora_with(change))
    _assert_one_error_line(_estimate("--model", str(tiny_model), "--adapter-config", str(adapter)))


@pytest.mark.parametrize("field", _lora_fields())
def test_a_wrong_type_in_any_lora_field_gives_one_line_naming_it(tmp_path, tiny_model, field):
    from peft import LoraConfig

    value = _wrong_value(typing.get_type_hints(LoraConfig)[field])
    adapter = _write(tmp_path, "adapter_config.json", {**LORA, field: value})
    line = _assert_one_error_line(_estimate("--model", str(tiny_model), "--adapter-config", str(adapter)))
    assert field in line or field == "peft_type"


@pytest.mark.parametrize("config", OTHER_METHODS.values(), ids=OTHER_METHODS.keys())
def test_sizes_beyond_the_model_are_refused_before_anything_is_built(tmp_path, tiny_model, config):
    adapter = _write(tmp_path, "adapter_config.json", config)
    started = time.monotonic()
    _assert_one_error_line(_estimate("--model", str(tiny_model), "--adapter-config", str(adapter)))
    assert time.monotonic() - started < 10


def test_an_adapter_folder_without_a_config_gives_one_line(tmp_path, tiny_model):
    _assert_one_error_line(_estimate("--model", str(tiny_model), "--adapter-config", str(tmp_path)))


# ---------------------------------------------------------------------------------------------- config.json

MODEL_CHANGES = {
    "hidden_size = 10**15": {"hidden_size": 10**15},
    "hidden_size as string": {"hidden_size": "64"},
    "hidden_size fractional": {"hidden_size": 64.5},
    "hidden_size true": {"hidden_size": True},
    "hidden_size NaN": {"hidden_size": float("nan")},
    "hidden_size Infinity": {"hidden_size": float("inf")},
    "hidden_size a list": {"hidden_size": [64]},
    "num_hidden_layers = -3": {"num_hidden_layers": -3},
    "num_hidden_layers = 10**9": {"num_hidden_layers": 10**9},
    "num_attention_heads zero": {"num_attention_heads": 0},
    "heads not a multiple of KV heads": {"num_key_value_heads": 3},
    "vocab_size 0": {"vocab_size": 0},
    "vocab_size 10**12": {"vocab_size": 10**12},
    "intermediate_size -1": {"intermediate_size": -1},
    "head_dim 10**8": {"head_dim": 10**8},
    "max_position_embeddings NaN": {"max_position_embeddings": float("nan")},
    "no hidden_size": {"hidden_size": None},
    "no model_type": {"model_type": None},
    "model_type a number": {"model_type": 7},
    "unknown model_type": {"model_type": "not-a-model-type"},
    "an encoder-only model": {"model_type": "bert", "architectures": ["BertForMaskedLM"]},
}

MALFORMED_MODEL_FILES = {
    "truncated JSON": json.dumps(TINY_MODEL)[:-15],
    "empty file": "",
    "a list": [TINY_MODEL],
    "a number": "42",
    "non-UTF-8 bytes": b"{\"model_type\": \"ll\xe9ma\"}",
    "nested too deep": "{\"a\": " * 100_000 + "1" + "}" * 100_000,
    "a number too long to read": '{"model_type": "llama", "hidden_size": ' + "6" * 5000 + "}",
}


def _model_folder(tmp_path: Path, content: object) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    _write(folder, "config.json", content)
    return folder


def _model_with(change: dict) -> dict:
    config = {**TINY_MODEL, **change}
    return {k: v for k, v in config.items() if v is not None}


@pytest.mark.parametrize("content", MALFORMED_MODEL_FILES.values(), ids=MALFORMED_MODEL_FILES.keys())
def test_unreadable_config_json_gives_one_line(tmp_path, content):
    folder = _model_folder(tmp_path, content)
    line = _assert_one_error_line(_estimate("--model", str(folder), "--method", "lora"))
    assert "config.json" in line


@pytest.mark.parametrize("change", MODEL_CHANGES.values(), ids=MODEL_CHANGES.keys())
def test_bad_config_json_figures_give_one_line_quickly(tmp_path, change):
    folder = _model_folder(tmp_path, _model_with(change))
    started = time.monotonic()
    _assert_one_error_line(_estimate("--model", str(folder), "--method", "lora"))
    assert time.monotonic() - started < 10  # refused before anything is built or traced


def test_a_config_json_path_is_read_like_its_folder(tmp_path):
    folder = _model_folder(tmp_path, _model_with({"hidden_size": 10**15}))
    line = _assert_one_error_line(_estimate("--model", str(folder / "config.json"), "--method", "lora"))
    assert "hidden_size" in line


def test_a_model_folder_without_config_json_gives_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_one_error_line(_estimate("--model", str(tmp_path / "empty"), "--method", "lora"))


# ------------------------------------------------------------------------- PEFT methods of the benchmark suite

# The suite's MetaMathQA configs (method_comparison/MetaMathQA/experiments), sized down to the tiny model.
SUITE_LIKE = {
    "WaveFT": {"peft_type": "WAVEFT", "task_type": "CAUSAL_LM", "n_frequency": 100, "scaling": 25.0,
               "wavelet_family": "db1", "use_idwt": True, "random_loc_seed": 777,
               "target_modules": ["q_proj", "v_proj"]},
    "VB-LoRA": {"peft_type": "VBLORA", "task_type": "CAUSAL_LM", "r": 4, "topk": 2, "num_vectors": 64,
                "vector_length": 16, "init_logits_std": 0.1, "init_vector_bank_bound": 0.02,
                "target_modules": ["v_proj", "q_proj"]},
    "MiCA": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "init_lora_weights": "mica"},
    "KaSA": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
             "kasa_config": {"beta": 0.0001, "gamma": 0.001}},
    "AdaMSS": {"peft_type": "ADAMSS", "task_type": "CAUSAL_LM", "r": 8, "num_subspaces": 2, "subspace_rank": 1,
               "init_weights": "orthogonal"},
    "AdaptionPrompt, every layer": {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_layers": 6,
                                    "adapter_len": 10, "target_modules": None},
    "AdaptionPrompt, the top 2 layers": {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM",
                                         "adapter_layers": 2, "adapter_len": 10},
}


def _peft_trainable(config_file: Path) -> int:
    import torch
    from peft import PeftConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from peftpick.adapters.files import read_adapter_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in TINY_MODEL.items() if k != "model_type"}))
    _raw, config = read_adapter_config(config_file)
    assert isinstance(config, PeftConfig)
    peft_model = get_peft_model(model, config)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("config", SUITE_LIKE.values(), ids=SUITE_LIKE.keys())
def test_suite_methods_the_trace_runs_count_trainable_parameters_as_peft_does(tmp_path, tiny_model, config):
    adapter = _write(tmp_path, "adapter_config.json", config)
    result = _estimate("--model", str(tiny_model), "--adapter-config", str(adapter), "--json")
    assert result.exit_code == 0, result.output
    estimate = json.loads(result.stdout)
    assert estimate["trainable_params"] == _peft_trainable(adapter)
    assert estimate["peak_reserved_bytes"] >= estimate["peak_allocated_bytes"] > 0


def test_frod_estimates_with_its_stand_ins_and_counts_as_peft_does(tmp_path, tiny_model):
    """The PEFT suite's FRoD config (its set-up needs the weights' values: estimator/frod.py stands in)."""
    adapter = _write(tmp_path, "adapter_config.json", {
        "peft_type": "FROD", "task_type": "CAUSAL_LM", "bias": "none", "init_weights": True,
        "regularization_alpha": 0.001, "runtime_offload_base_weight": True, "save_projection": True,
        "sparse_rate": 0.01})
    result = _estimate("--model", str(tiny_model), "--adapter-config", str(adapter), "--json")
    assert result.exit_code == 0, result.output
    estimate = json.loads(result.stdout)
    assert estimate["trainable_params"] == _peft_trainable(adapter)
    assert estimate["peak_reserved_bytes"] >= estimate["peak_allocated_bytes"] > 0
    assert any("FRoD" in note for note in estimate["assumptions"])


def test_anything_else_that_fails_inside_the_trace_is_one_line_naming_the_method(tmp_path, tiny_model, monkeypatch):
    import peftpick.estimator.training as training

    def broken(*_args, **_kwargs):
        raise RuntimeError("an operator the meta device lacks\nsecond line")

    monkeypatch.setattr(training, "trace_training", broken)
    adapter = _write(tmp_path, "adapter_config.json", {
        "peft_type": "LOHA", "task_type": "CAUSAL_LM", "r": 8, "alpha": 16, "target_modules": ["q_proj"]})
    line = _assert_one_error_line(_estimate("--model", str(tiny_model), "--adapter-config", str(adapter)))
    assert "LOHA cannot be estimated" in line and "an operator the meta device lacks" in line
    assert "second line" not in line


# ------------------------------------------------------------------------------------------ random mutations

GARBAGE = ["", "x" * 300, -1, 0, 2**63, 10**30, -(10**18), 1.5, float("nan"), float("inf"), True, None, [], [None],
           [[[]]], {}, {"a": {"b": [1, "2"]}}, "\u0000\udcff".encode("utf-8", "surrogatepass").decode("latin-1")]


def _mutations(base: dict, seed: int, count: int) -> list[dict]:
    """`count` copies of `base` with one to three fields (known or new) set to garbage, reproducibly."""
    import random

    rng = random.Random(seed)
    keys = [*base, "rank_pattern", "layers_to_transform", "head_dim", "num_key_value_heads", "unknown_key"]
    mutated = []
    for _ in range(count):
        config = dict(base)
        for key in rng.sample(keys, rng.randint(1, 3)):
            config[key] = rng.choice(GARBAGE)
        mutated.append(config)
    return mutated


def _assert_no_traceback(result) -> None:
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    if result.exit_code == 2:
        _assert_one_error_line(result)


@pytest.mark.parametrize("config", _mutations(LORA, seed=12, count=20), ids=lambda c: "mutated-lora")
def test_randomly_broken_adapter_configs_never_give_a_traceback(tmp_path, tiny_model, config):
    adapter = _write(tmp_path, "adapter_config.json", config)
    _assert_no_traceback(_estimate("--model", str(tiny_model), "--adapter-config", str(adapter)))


@pytest.mark.parametrize("config", _mutations(TINY_MODEL, seed=34, count=20), ids=lambda c: "mutated-config")
def test_randomly_broken_config_json_never_gives_a_traceback(tmp_path, config):
    folder = _model_folder(tmp_path, config)
    _assert_no_traceback(_estimate("--model", str(folder), "--method", "lora"))
