"""The `peftpick` command line, driven through typer's CliRunner.

The recommendation itself is replaced by the hand-made sample of test_report.py (monkeypatched into
`peftpick.recommend`), so these tests check the CLI layer: options, exit codes, one-line errors, clean --json.
`estimate`, `models` and `kb update` run for real on small inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import peftpick
from peftpick.cli import app
from peftpick.errors import PeftpickError
from peftpick.knowledge.extract import default_data_dir
from test_report import EXCLUSION_REASON, TOP_LEVEL_KEYS, VERDICT, memory, sample_recommendation

RECOMMEND_OPTIONS = ("--model", "--vram", "--serve", "--multi-adapter", "--quant", "--goal", "--seq-len",
                     "--batch-size", "--methods", "--json", "--report")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def recorded_calls(monkeypatch) -> list[dict]:
    """Replace peftpick.recommend with one that records its arguments and returns the sample recommendation."""
    calls: list[dict] = []

    def fake_recommend(model, **kwargs):
        progress = kwargs.pop("progress")  # the CLI hands its spinner to the library's progress callback
        progress("estimating memory of rsLoRA (1/3)")
        assert kwargs.pop("workers") >= 1  # the CLI estimates in parallel, one process per core (at most 4)
        calls.append({"model": model, **kwargs})
        return sample_recommendation(vram_gib=kwargs.get("vram_gb") or 8.0)

    monkeypatch.setattr(peftpick, "recommend", fake_recommend, raising=False)
    return calls


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


# ----------------------------------------------------------------------------------------------- help


def test_help_lists_every_option_fast(runner: CliRunner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for option in RECOMMEND_OPTIONS:
        assert option in result.stdout, option
    for command in ("estimate", "models", "kb"):
        assert command in result.stdout


def test_estimate_help_lists_its_options(runner: CliRunner):
    result = runner.invoke(app, ["estimate", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--adapter-config", "--method", "--rank", "--targets", "--batch-size", "--seq-len",
                   "--grad-ckpt", "--optimizer", "--dtype", "--json"):
        assert option in result.stdout, option


# ------------------------------------------------------------------------------------------ bad input


def test_missing_model_is_one_line_exit_2(runner: CliRunner, recorded_calls):
    result = runner.invoke(app, ["--vram", "24"])
    assert result.exit_code == 2
    assert "--model is required" in _one_error_line(result)
    assert recorded_calls == []


def test_library_error_is_one_line_exit_2(runner: CliRunner, monkeypatch):
    def failing_recommend(model, **kwargs):
        raise PeftpickError(f"unknown model {model!r}", "run `peftpick models` to list them")

    monkeypatch.setattr(peftpick, "recommend", failing_recommend, raising=False)
    result = runner.invoke(app, ["--model", "no-such-model", "--vram", "24"])
    assert result.exit_code == 2
    assert _one_error_line(result) == "error: unknown model 'no-such-model'; run `peftpick models` to list them"
    assert result.stdout == ""


@pytest.mark.parametrize("option, value", [("--serve", "triton"), ("--quant", "3bit"), ("--goal", "cheapest")])
def test_unknown_choice_is_rejected_before_any_work(runner: CliRunner, recorded_calls, option: str, value: str):
    result = runner.invoke(app, ["--model", "smollm2-135m", "--vram", "8", option, value])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert f"unknown {option} value {value!r}" in line and "use one of:" in line
    assert recorded_calls == []


def test_report_with_a_wrong_suffix_fails_first(runner: CliRunner, recorded_calls, tmp_path: Path):
    result = runner.invoke(app, ["--model", "smollm2-135m", "--vram", "8", "--report", str(tmp_path / "r.pdf")])
    assert result.exit_code == 2
    assert "r.pdf" in _one_error_line(result)
    assert recorded_calls == []


def test_typer_usage_errors_exit_2(runner: CliRunner):
    assert runner.invoke(app, ["--no-such-option"]).exit_code == 2
    assert runner.invoke(app, ["--model", "x", "--vram", "lots"]).exit_code == 2


def test_recommend_options_before_a_subcommand_are_refused(runner: CliRunner):
    result = runner.invoke(app, ["--model", "smollm2-135m", "models"])
    assert result.exit_code == 2
    assert "after the subcommand" in _one_error_line(result)


def test_ctrl_c_prints_interrupted_and_exits_130(runner: CliRunner, monkeypatch):
    def interrupted(model, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(peftpick, "recommend", interrupted, raising=False)
    result = runner.invoke(app, ["--model", "smollm2-135m", "--vram", "8"])
    assert result.exit_code == 130
    assert result.stderr.strip() == "interrupted"


# ----------------------------------------------------------------------------------------- recommendation


def test_json_output_is_clean_and_has_the_documented_keys(runner: CliRunner, recorded_calls):
    result = runner.invoke(app, [
        "--model", "smollm2-135m", "--vram", "8", "--serve", "SGLang", "--multi-adapter", "--quant", "4bit",
        "--goal", "memory", "--seq-len", "512", "--batch-size", "8", "--json",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert set(data) == TOP_LEVEL_KEYS
    assert data["best"] == "rslora" and data["verdict"] == VERDICT
    assert recorded_calls == [{
        "model": "smollm2-135m", "vram_gb": 8.0, "serve": "sglang", "multi_adapter": True, "quant": "4bit",
        "goal": "memory", "seq_len": 512, "batch_size": 8, "probe": None, "probe_steps": 10, "data": None,
    }]


def test_probe_options_are_passed_to_the_recommender(runner: CliRunner, recorded_calls):
    result = runner.invoke(app, ["--model", "smollm2-135m", "--vram", "8", "--no-probe", "--probe-steps", "5", "--json"])
    assert result.exit_code == 0, result.output
    assert (recorded_calls[0]["probe"], recorded_calls[0]["probe_steps"]) == (False, 5)


def test_probe_steps_below_two_is_one_line_exit_2(runner: CliRunner, recorded_calls):
    result = runner.invoke(app, ["--model", "smollm2-135m", "--vram", "8", "--probe-steps", "1"])
    assert result.exit_code == 2
    assert "--probe-steps must be at least 2" in _one_error_line(result)
    assert recorded_calls == []


def test_methods_option_restricts_the_catalogue(runner: CliRunner, recorded_calls):
    result = runner.invoke(app, ["--model", "smollm2-135m", "--vram", "8", "--methods", "LoRA, dora,full", "--json"])
    assert result.exit_code == 0, result.output
    assert recorded_calls[0]["methods"] == ["lora", "dora", "full"]


def test_vram_left_out_is_passed_as_none(runner: CliRunner, recorded_calls):
    result = runner.invoke(app, ["--model", "smollm2-135m", "--json"])
    assert result.exit_code == 0, result.output
    assert recorded_calls[0]["vram_gb"] is None
    # no --serve: the library picks the usual stack for the model's kind (vLLM for an LM, diffusers for images)
    assert (recorded_calls[0]["serve"], recorded_calls[0]["quant"], recorded_calls[0]["goal"]) == \
        (None, "none", "balanced")


def test_report_is_printed_and_written(runner: CliRunner, recorded_calls, tmp_path: Path):
    target = tmp_path / "report.html"
    result = runner.invoke(app, ["--model", "smollm2-135m", "--vram", "8", "--report", str(target)])
    assert result.exit_code == 0, result.output
    printed = " ".join(result.stdout.split())
    assert VERDICT in printed
    assert "rsLoRA" in printed and "Excluded" in printed
    assert set(EXCLUSION_REASON.split()) <= set(printed.split())
    assert 'class="picture memory"' in target.read_text(encoding="utf-8")
    assert f"report written to {target}" in result.stderr


# ----------------------------------------------------------------------------------------------- estimate


def test_estimate_full_fine_tuning_json(runner: CliRunner):
    result = runner.invoke(app, ["estimate", "--model", "smollm2-135m", "--method", "full", "--batch-size", "1",
                                 "--seq-len", "16", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["peak_allocated_bytes"] > 0
    assert data["peak_reserved_bytes"] >= data["peak_allocated_bytes"]
    assert data["trainable_params"] == data["total_params"] > 100_000_000
    assert {"breakdown", "assumptions", "source", "shape"} <= set(data)
    assert data["shape"]["batch_size"] == 1 and data["shape"]["seq_len"] == 16


def test_estimate_with_an_adapter_config_json(runner: CliRunner, tmp_path: Path):
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
                                  "target_modules": ["q_proj", "v_proj"]}), encoding="utf-8")
    result = runner.invoke(app, ["estimate", "--model", "smollm2-135m", "--adapter-config", str(config),
                                 "--batch-size", "1", "--seq-len", "16", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["adapter"] == str(config)
    assert 0 < data["trainable_params"] < data["total_params"]
    assert data["peak_reserved_bytes"] >= data["peak_allocated_bytes"] > 0


def test_estimate_table_and_the_arguments_it_passes(runner: CliRunner, monkeypatch):
    calls = []

    def fake_estimate(model, adapter, **kwargs):
        calls.append((model, adapter, kwargs))
        return memory(2.5, 3.0, 1_000_000, micro_batch=kwargs["batch_size"])

    monkeypatch.setattr("peftpick.estimator.estimate", fake_estimate)
    result = runner.invoke(app, ["estimate", "--model", "smollm2-135m", "--method", "LoRA", "--rank", "8",
                                 "--targets", "q_proj, v_proj", "--batch-size", "2", "--seq-len", "64",
                                 "--grad-ckpt", "--optimizer", "lora-fa", "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert calls == [("smollm2-135m", "lora", {
        "batch_size": 2, "seq_len": 64, "gradient_checkpointing": True, "optimizer": "lora-fa", "dtype": "float16",
        "rank": 8, "targets": ["q_proj", "v_proj"], "quant": "none", "loss": "stock", "trainer": "plain",
    })]
    for label in ("peak allocated", "peak reserved (must fit)", "3.000", "activations", "Trainable parameters",
                  "Assumptions", "estimated"):
        assert label in result.stdout, label


@pytest.mark.parametrize("args", [
    ["--batch-size", "1"],  # neither --method nor --adapter-config
    ["--method", "full", "--adapter-config", "a.json"],  # both
    ["--adapter-config", "a.json", "--rank", "8"],  # --rank without --method
])
def test_estimate_adapter_choice_errors(runner: CliRunner, args: list[str]):
    result = runner.invoke(app, ["estimate", "--model", "smollm2-135m", *args])
    assert result.exit_code == 2
    _one_error_line(result)


def test_estimate_unknown_model_is_one_line(runner: CliRunner):
    result = runner.invoke(app, ["estimate", "--model", "smollm2-135q", "--method", "full"])
    assert result.exit_code == 2
    assert "smollm2-135" in _one_error_line(result)


# -------------------------------------------------------------------------------------------- models / kb


def test_models_lists_the_registry(runner: CliRunner):
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    names = [entry["name"] for entry in json.loads(result.stdout)]
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert {"smollm2-135m", "llama-3.2-3b"} <= set(names)

    table = runner.invoke(app, ["models"])
    assert table.exit_code == 0
    for name in names:
        assert name in table.stdout, name


def _result_file(experiment: str, score: float) -> dict:
    """A minimal MetaMathQA result file in the layout of PEFT's method comparison suite."""
    return {
        "run_info": {
            "experiment_name": experiment,
            "created_at": "2026-10-01T00:00:00+00:00",
            "total_time": 600.0,
            "train_config": {"model_id": "meta-llama/Llama-3.2-3B", "dtype": "bfloat16", "batch_size": 4,
                             "max_steps": 100, "eval_steps": 50, "max_seq_length": 768, "use_gc": False,
                             "optimizer_type": "AdamW", "optimizer_kwargs": {"lr": 2e-4}},
            "peft_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
                            "target_modules": ["q_proj", "v_proj"]},
        },
        "train_info": {
            "status": "success", "train_time": 500.0, "file_size": 9_000_000, "num_trainable_params": 2_293_760,
            "num_total_params": 3_215_043_584, "accelerator_memory_max": 20_000_000_000,
            "metrics": [
                {"step": 50, "valid accuracy": 0.2, "train loss": 1.1, "tokens / sec": 5000.0},
                {"step": 100, "test accuracy": score, "train loss": 0.9, "forgetting": 0.04},
            ],
        },
        "meta_info": {"system_info": {"accelerator": "NVIDIA H100"}, "package_info": {"peft-version": "0.21.2"}},
    }


def test_kb_update_ingests_new_results_into_a_copy(runner: CliRunner, tmp_path: Path):
    data_dir = tmp_path / "data"
    shutil.copytree(default_data_dir(), data_dir)
    results = tmp_path / "results"
    results.mkdir()
    (results / "lora--cli-test.json").write_text(json.dumps(_result_file("lora/cli-test", 0.41)), encoding="utf-8")
    bundled_before = (default_data_dir() / "benchmark_runs.csv").read_bytes()

    args = ["kb", "update", str(results), "--data-dir", str(data_dir), "--source-commit", "abc1234"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "1 added" in first.stdout and "abc1234" in first.stdout
    assert "lora/cli-test" in (data_dir / "benchmark_runs.csv").read_text(encoding="utf-8")

    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "0 added" in second.stdout and "1 unchanged" in second.stdout
    assert (default_data_dir() / "benchmark_runs.csv").read_bytes() == bundled_before


def test_kb_update_on_a_missing_folder_is_one_line(runner: CliRunner, tmp_path: Path):
    result = runner.invoke(app, ["kb", "update", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 2
    assert "nowhere" in _one_error_line(result)


@pytest.mark.parametrize("config, expected", [
    ({"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
      "intermediate_size": 128, "vocab_size": 100, "architectures": ["BertModel"]}, "is an encoder-only model (bert)"),
    ({"model_type": "t5", "d_model": 64, "num_layers": 2, "num_heads": 2, "d_ff": 128, "vocab_size": 100},
     "model type 't5' is not a causal language model"),
    ({"model_type": "llama", "hidden_size": 1e12, "num_hidden_layers": 2, "num_attention_heads": 2,
      "intermediate_size": 128, "vocab_size": 100}, "hidden_size is 1000000000000.0, expected a whole number"),
], ids=["bert", "t5", "huge-number"])
def test_configs_peftpick_cannot_plan_get_one_line(runner: CliRunner, tmp_path, config, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    for args in (["--model", str(path), "--vram", "8"], ["estimate", "--model", str(path), "--method", "lora"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert expected in result.output and "Traceback" not in result.output


def test_output_folders_are_checked_before_the_work(runner: CliRunner, monkeypatch):
    calls = []
    monkeypatch.setattr("peftpick.recommend", lambda *a, **k: calls.append(1))
    for option in ("--report", "--emit"):
        result = runner.invoke(app, ["--model", "smollm2-135m", "--vram", "8", option, "/no/such/dir/x.html"])
        assert result.exit_code == 2 and "folder /no/such/dir does not exist" in result.output
    assert calls == []  # nothing was computed


def test_seq_len_beyond_the_context_length_is_refused(runner: CliRunner):
    for args in (["--model", "smollm2-135m", "--vram", "8", "--seq-len", "100000"],
                 ["estimate", "--model", "smollm2-135m", "--method", "lora", "--seq-len", "100000"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "--seq-len 100000 is beyond the context length of smollm2-135m (8,192 tokens" in result.output


def test_the_script_exits_with_the_commands_code_after_its_exit_handlers_and_flushed_output(tmp_path):
    """`main` skips the interpreter's teardown (os._exit) but not what a normal exit does: the exit handlers run,
    both streams are flushed, and the exit code is the command's (0, 2 for bad input, 1 for sys.exit("text"))."""
    import subprocess
    import sys
    import textwrap

    def run(argv: list[str], before: str = "") -> subprocess.CompletedProcess:
        script = textwrap.dedent(f"""
            import atexit, sys
            from peftpick import cli
            atexit.register(lambda: sys.stdout.write("exit handler ran\\n"))
            {before}
            sys.argv = ["peftpick", *{argv!r}]
            cli.main()
            print("never reached")
        """)
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)

    listed = run(["models"])
    assert listed.returncode == 0, listed.stderr
    assert "bundled models" in listed.stdout and listed.stdout.rstrip().endswith("exit handler ran")
    assert "never reached" not in listed.stdout
    bad = run(["--model", "no-such-model", "--vram", "16"])
    assert bad.returncode == 2 and "unknown model 'no-such-model'" in bad.stderr and "Traceback" not in bad.stderr
    assert "exit handler ran" in bad.stdout
    text = run(["models"], before="cli.app = lambda: sys.exit('stopped: a message')")
    assert text.returncode == 1 and "stopped: a message" in text.stderr
