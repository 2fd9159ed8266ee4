"""The `peftpick` command line: a thin layer over the library API.

    peftpick --model llama-3.2-3b --vram 24 --serve vllm          # recommend a method, print the report
    peftpick estimate --model smollm2-135m --method full ...      # peak memory of one training setting
    peftpick kb update DIR                                        # ingest new benchmark result files
    peftpick models                                               # list the bundled architectures

Heavy libraries (torch, transformers, peft, pandas) are imported inside the commands, so `peftpick --help`
answers at once. Bad input (a PeftpickError) prints one line, `error: <problem>; <fix>`, on stderr and exits
with 2; Ctrl-C prints "interrupted" and exits with 130. Progress spinners go to stderr only, so `--json`
output on stdout stays parseable.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from peftpick.errors import PeftpickError
from peftpick.types import Goal, Quant, Serve, Strategy

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="peftpick",
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
kb_app = typer.Typer(help="Maintain the knowledge base of benchmark runs.", no_args_is_help=True)
app.add_typer(kb_app, name="kb")


def _names(choices: type[Enum]) -> str:
    return ", ".join(member.value for member in choices)


# ---------------------------------------------------------------------------------------------- plumbing


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit code 2."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


@contextlib.contextmanager
def _handled_errors() -> Iterator[None]:
    """Turn PeftpickError into one line and exit 2, Ctrl-C into "interrupted" and exit 130; no tracebacks."""
    try:
        yield
    except PeftpickError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


@contextlib.contextmanager
def _spinner(message: str) -> Iterator[Callable[[str], None]]:
    """A rich status spinner on stderr (silent when stderr is not a terminal); yields a function that
    replaces its message, for the library's progress callbacks."""
    from rich.console import Console

    with Console(stderr=True).status(message) as status:
        yield lambda text: status.update(text)


def _accepts(function: Callable[..., Any], name: str) -> bool:
    """Whether `function` takes a keyword argument `name` (by name or through **kwargs)."""
    import inspect

    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _choice(value: str, choices: type[Enum], option: str) -> str:
    """`value` checked against an enum's values (case ignored), as a one-line PeftpickError when unknown."""
    normalised = value.strip().lower()
    if normalised not in {member.value for member in choices}:
        raise PeftpickError(f"unknown {option} value {value!r}", f"use one of: {_names(choices)}")
    return normalised


def _library_recommend() -> Callable[..., Any]:
    """`peftpick.recommend`, looked up when called so tests (and embedding code) can replace it."""
    import peftpick

    recommend = getattr(peftpick, "recommend", None)
    if recommend is None:
        import peftpick.recommender as recommender

        recommend = getattr(recommender, "recommend", None)
    if recommend is None:
        raise PeftpickError("this peftpick installation has no recommender", "reinstall peftpick")
    return recommend


def _version_callback(value: bool) -> None:
    if value:
        from peftpick import __version__

        typer.echo(f"peftpick {__version__}")
        raise typer.Exit()


# --------------------------------------------------------------------------------------- recommendation

_RECOMMEND_OPTIONS = ("model", "vram", "serve", "multi_adapter", "quant", "goal", "seq_len", "batch_size",
                      "methods", "json_output", "report", "probe", "probe_steps", "data", "resolution", "frames",
                      "cached_inputs", "loss", "trainer", "emit", "packing", "no_cache", "gpus", "strategy",
                      "optimizer")


@app.callback(invoke_without_command=True)
def recommend_command(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Model: a bundled name (see `peftpick models`), a hub id, or a local folder.",
        show_default=False)] = None,
    vram: Annotated[Optional[float], typer.Option(
        "--vram", help="GPU memory in GiB (2^30 bytes); leave out to detect the local GPU through NVML.",
        show_default=False)] = None,
    serve: Annotated[Optional[str], typer.Option(
        "--serve", help=f"Where the result is served or used: {_names(Serve)} (default: vllm for language models, "
        "diffusers for image and video models).", show_default=False)] = None,
    multi_adapter: Annotated[bool, typer.Option(
        "--multi-adapter", help="Several adapters must be served over one shared base model.")] = False,
    quant: Annotated[str, typer.Option(
        "--quant", help=f"Quantization of the frozen base weights while training: {_names(Quant)}.")]
        = Quant.NONE.value,
    goal: Annotated[str, typer.Option(
        "--goal", help=f"What the ranking favours: {_names(Goal)}.")] = Goal.BALANCED.value,
    seq_len: Annotated[int, typer.Option(
        "--seq-len", help="Longest training sequence in tokens.")] = 768,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Effective batch size to keep, split into micro-batches if memory needs it (default: 4 "
        "for language models, 2 for image and video models).", show_default=False)] = None,
    methods: Annotated[Optional[str], typer.Option(
        "--methods", help="Only consider these methods (comma-separated catalogue keys, e.g. lora,dora,full).",
        show_default=False)] = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print the recommendation as JSON (schema_version 1) and nothing else on stdout.")] = False,
    report: Annotated[Optional[Path], typer.Option(
        "--report", help="Also write the report to FILE: .md (Markdown) or .html (with pictures).",
        metavar="FILE", show_default=False)] = None,
    probe: Annotated[Optional[bool], typer.Option(
        "--probe/--no-probe", help="Micro-train the top 8 candidates first to measure memory, speed and loss "
        "(default: only when a CUDA GPU is present; --probe on a CPU: small models, no memory figures).",
        show_default=False)] = None,
    probe_steps: Annotated[int, typer.Option(
        "--probe-steps", "--steps", help="Measured optimizer steps per probe.")] = 10,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="Your training data: .jsonl/.json, .csv/.tsv, .parquet or .txt. Its token lengths (with the "
        "model's tokenizer, when it is on this machine) set the estimated peak; the probes train on it (default: "
        "built-in arithmetic problems).", metavar="FILE", show_default=False)] = None,
    packing: Annotated[bool, typer.Option(
        "--packing", help="The --data examples are packed into full rows of --seq-len tokens (no padding).")]
        = False,
    resolution: Annotated[Optional[int], typer.Option(
        "--resolution", help="Image and video models: training resolution in pixels per side (default: the "
        "model's usual).", show_default=False)] = None,
    frames: Annotated[Optional[int], typer.Option(
        "--frames", help="Video models: frames per training clip (default: the model's usual).",
        show_default=False)] = None,
    cached_inputs: Annotated[bool, typer.Option(
        "--cached-inputs/--resident-encoders", help="Image and video models: text embeddings and latents computed "
        "beforehand (text encoders and VAE off the GPU), or text encoders and VAE on the GPU while training.")]
        = True,
    emit: Annotated[Optional[Path], typer.Option(
        "--emit", help="Also write a runnable TRL training script for the best candidate and its plan.",
        metavar="FILE", show_default=False)] = None,
    loss: Annotated[Optional[str], typer.Option(
        "--loss", help="Language models: the loss kernel, stock, liger (Liger's fused linear cross-entropy) or chunked "
        "(TRL's chunked LM head); default: stock, or liger where the stock loss needs gradient checkpointing to fit "
        "and Liger patches the model.", show_default=False)] = None,
    trainer: Annotated[str, typer.Option(
        "--trainer", help="Language models: the training loop the estimates model, plain, hf (transformers' Trainer) "
        "or trl (TRL's SFTTrainer).")] = "plain",
    optimizer: Annotated[Optional[str], typer.Option(
        "--optimizer", help="The optimizer every method trains with: adamw, adamw-8bit, paged-adamw-8bit, adafactor "
        "or sgd (LoRA-FA keeps its own); default: AdamW, or bitsandbytes' 8-bit AdamW for a method that fits no "
        "other way.", show_default=False)] = None,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Estimate and probe again: neither read nor write the caches ($PEFTPICK_CACHE_DIR, "
        "else ~/.cache/peftpick).")] = False,
    gpus: Annotated[int, typer.Option(
        "--gpus", help="GPUs on the node, each with --vram GiB; figures are then per GPU.")] = 1,
    strategy: Annotated[str, typer.Option(
        "--strategy", help=f"How training spreads over the GPUs: {_names(Strategy)} (auto: the cheapest that "
        "fits, no sharding when one GPU is enough).")] = Strategy.AUTO.value,
    version: Annotated[bool, typer.Option(
        "--version", help="Print the version and exit.", callback=_version_callback, is_eager=True)] = False,
) -> None:
    """Recommend a parameter-efficient fine-tuning method for your model, GPU and serving stack, with the evidence.

    Without a subcommand: peftpick --model llama-3.2-3b --vram 24 --serve vllm
    """
    if ctx.invoked_subcommand is not None:
        # Compared by name: typer vendors its own copy of click, so click's ParameterSource is another enum.
        given = [name for name in _RECOMMEND_OPTIONS
                 if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") in ("COMMANDLINE", "ENVIRONMENT")]
        if given:
            flags = ", ".join("--json" if name == "json_output" else "--" + name.replace("_", "-") for name in given)
            _fail(f"{flags} before `{ctx.invoked_subcommand}` are options of the recommendation, not of "
                  f"`{ctx.invoked_subcommand}`; put options after the subcommand (see peftpick "
                  f"{ctx.invoked_subcommand} --help)")
        return
    with _handled_errors():
        if model is None:
            raise PeftpickError(
                "--model is required",
                "pass e.g. --model llama-3.2-3b (`peftpick models` lists the bundled names), or run a subcommand "
                "(peftpick --help)",
            )
        serve = _choice(serve, Serve, "--serve") if serve is not None else None
        quant = _choice(quant, Quant, "--quant")
        goal = _choice(goal, Goal, "--goal")
        from peftpick.recommender.request import validate_gpus

        validate_gpus(gpus, strategy, quant)  # before the long part
        if report is not None:
            from peftpick.report.files import report_format

            report_format(report)  # a wrong suffix fails now, not after the long part
        for option, path in (("--report", report), ("--emit", emit)):
            if path is not None and not path.parent.is_dir():
                raise PeftpickError(f"{option} {path}: folder {path.parent} does not exist",
                                    "create it first, or pass a path in an existing folder")
        recommend = _library_recommend()
        extra: dict[str, Any] = {}
        if methods:
            extra["methods"] = [name.strip().lower() for name in methods.split(",") if name.strip()]
        if probe_steps < 2:
            raise PeftpickError(f"--probe-steps must be at least 2, got {probe_steps}",
                                "a loss slope needs two optimizer steps or more; pass e.g. --probe-steps 10")
        extra.update(probe=probe, probe_steps=probe_steps, data=data)
        for name, value, default in (("resolution", resolution, None), ("frames", frames, None),
                                     ("cached_inputs", cached_inputs, True), ("loss", loss, None),
                                     ("trainer", trainer, "plain"), ("packing", packing, False),
                                     ("cache", not no_cache, True), ("gpus", gpus, 1),
                                     ("strategy", strategy, Strategy.AUTO.value), ("optimizer", optimizer, None)):
            if value != default:
                extra[name] = value
        if _accepts(recommend, "workers"):
            from peftpick.recommender import default_workers

            extra["workers"] = default_workers()
        with _spinner(f"Resolving {model} and estimating memory for each method...") as show_progress:
            if _accepts(recommend, "progress"):
                extra["progress"] = show_progress
            rec = recommend(model, vram_gb=vram, serve=serve, multi_adapter=multi_adapter, quant=quant, goal=goal,
                            seq_len=seq_len, batch_size=batch_size, **extra)

        from peftpick.report import print_report, to_dict, write_report

        if json_output:
            typer.echo(json.dumps(to_dict(rec), indent=2, allow_nan=False))
        else:
            from rich.console import Console

            print_report(rec, Console())
        if report is not None:
            written = write_report(rec, report)
            typer.echo(f"report written to {written}", err=True)
        if emit is not None:
            from peftpick.report.trainer_config import training_script

            emit.write_text(training_script(rec))
            typer.echo(f"TRL training script written to {emit} (python {emit} --data data.jsonl)", err=True)


# --------------------------------------------------------------------------------------------- estimate


@app.command("estimate")
def estimate_command(
    model: Annotated[str, typer.Option(
        "--model", "-m", help="Model: a bundled name, a hub id, or a local folder.", show_default=False)],
    adapter_config: Annotated[Optional[Path], typer.Option(
        "--adapter-config", help="PEFT adapter_config.json (or its folder) to estimate.", metavar="FILE",
        show_default=False)] = None,
    method: Annotated[Optional[str], typer.Option(
        "--method", help="Method name instead of a config: lora, dora, oft, ... or full.", show_default=False)]
        = None,
    rank: Annotated[Optional[int], typer.Option(
        "--rank", help="Rank for --method (default: the method's own).", show_default=False)] = None,
    targets: Annotated[Optional[str], typer.Option(
        "--targets", help="Comma-separated target modules for --method, e.g. q_proj,v_proj.", show_default=False)]
        = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Micro-batch size.")] = 4,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Sequence length in tokens.")] = 768,
    grad_ckpt: Annotated[bool, typer.Option(
        "--grad-ckpt", help="Gradient checkpointing on (non-reentrant).")] = False,
    optimizer: Annotated[str, typer.Option("--optimizer", help=(
        "adamw, adamw-8bit, paged-adamw-8bit (bitsandbytes), adafactor, sgd (momentum 0.9) or lora-fa "
        "(LoRA adapters only)."))] = "adamw",
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="Base weight dtype: bfloat16, float16 or float32 (default: the model's).",
        show_default=False)] = None,
    quant: Annotated[str, typer.Option(
        "--quant", help=f"Quantization of the frozen base weights (bitsandbytes): {_names(Quant)}.")]
        = Quant.NONE.value,
    loss: Annotated[str, typer.Option(
        "--loss", help="Loss kernel: stock (full logits), liger (Liger's fused linear cross-entropy) or chunked "
        "(TRL's chunked LM head).")] = "stock",
    trainer: Annotated[str, typer.Option(
        "--trainer", help="Training loop: plain (keeps the output), hf (transformers' Trainer) or trl (TRL's "
        "SFTTrainer).")] = "plain",
    exact: Annotated[bool, typer.Option(
        "--exact", help="Trace every layer instead of repeating a few (slower, same peaks).")] = False,
    gpus: Annotated[int, typer.Option(
        "--gpus", help="GPUs the run is spread over; the figures are then per GPU (--batch-size is per GPU).")] = 1,
    strategy: Annotated[str, typer.Option(
        "--strategy", help="With --gpus: ddp, fsdp2, zero2, zero3 or their -offload variants.")] = "single",
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print JSON (peak_allocated_bytes, peak_reserved_bytes, breakdown, ...) only.")] = False,
) -> None:
    """Estimate peak GPU memory of one training setting, without a GPU."""
    with _handled_errors():
        from peftpick.recommender.request import validate_gpus

        sharding = {"gpus": 1, "strategy": Strategy.SINGLE}
        if gpus != 1 or strategy != Strategy.SINGLE.value:
            if gpus > 1 and strategy == Strategy.SINGLE.value:
                raise PeftpickError("--gpus needs a --strategy for the estimate", "pass e.g. --strategy fsdp2")
            sharding = validate_gpus(gpus, strategy, quant)
            if sharding["strategy"] is Strategy.AUTO:
                raise PeftpickError("the estimate needs a named --strategy",
                                    "pass e.g. --strategy fsdp2 (peftpick --gpus N chooses one for you)")
        adapter = _adapter_choice(adapter_config, method, rank, targets)
        target_list = [name.strip() for name in targets.split(",") if name.strip()] if targets else None
        from peftpick.estimator import estimate

        with _spinner(f"Tracing a training step of {model} on the meta device..."):  # a few seconds
            result = estimate(model, adapter, batch_size=batch_size, seq_len=seq_len,
                              gradient_checkpointing=grad_ckpt, optimizer=optimizer, dtype=dtype, rank=rank,
                              targets=target_list, quant=quant, loss=loss, trainer=trainer,
                              **({"exact": True} if exact else {}))
            if sharding["strategy"] is not Strategy.SINGLE:
                from peftpick.estimator.sharding import per_gpu
                from peftpick.knowledge.architectures import resolve_model

                result = per_gpu(result, resolve_model(model), sharding["gpus"], sharding["strategy"])

        from peftpick.report import estimate_to_dict

        adapter_label = str(adapter_config) if adapter_config is not None else str(method)
        if json_output:
            typer.echo(json.dumps({"model": model, "adapter": adapter_label, **estimate_to_dict(result)},
                                  indent=2, allow_nan=False))
        else:
            _print_estimate(model, adapter_label, result)


def _adapter_choice(adapter_config: Path | None, method: str | None, rank: int | None,
                    targets: str | None) -> Any:
    """What `estimate` takes as its adapter: the config path, "full", or a method name."""
    if (adapter_config is None) == (method is None):
        raise PeftpickError("give exactly one of --adapter-config and --method",
                            "e.g. --method lora --rank 16, or --adapter-config path/to/adapter_config.json")
    if adapter_config is not None:
        if rank is not None or targets is not None:
            raise PeftpickError("--rank and --targets apply to --method only",
                                "edit the adapter config instead, or use --method")
        return adapter_config
    return method.strip().lower()


def _print_estimate(model: str, adapter_label: str, result: Any) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from peftpick.report.formatting import count, gib

    console = Console()
    shape = result.shape
    table = Table(box=box.SIMPLE_HEAD, title=f"Peak GPU memory: {model} with {adapter_label}", title_justify="left")
    table.add_column("Part")
    table.add_column("Bytes", justify="right")
    table.add_column("GiB", justify="right")
    for part, n_bytes in result.breakdown.items():
        table.add_row(str(part), f"{n_bytes:,}", gib(n_bytes, 3))
    table.add_section()
    table.add_row("peak allocated (sum of parts)", f"{result.peak_allocated_bytes:,}",
                  gib(result.peak_allocated_bytes, 3))
    table.add_row("peak reserved (must fit)", f"{result.peak_reserved_bytes:,}", gib(result.peak_reserved_bytes, 3))
    console.print(table)
    console.print(
        f"Trainable parameters: {count(result.trainable_params)} of {count(result.total_params)} "
        f"({result.trainable_params:,} of {result.total_params:,})"
    )
    console.print(
        f"Setting: micro-batch {shape.batch_size}, {shape.seq_len} tokens, {shape.dtype}, optimizer {shape.optimizer}, "
        f"gradient checkpointing {'on' if shape.gradient_checkpointing else 'off'}; figures {result.source} "
        "(GiB = 2^30 bytes)",
        highlight=False,
    )
    if result.assumptions:
        console.print("Assumptions:")
        for assumption in result.assumptions:
            console.print(f"- {assumption}", highlight=False, markup=False)


# ------------------------------------------------------------------------------------------- knowledge


@kb_app.command("update")
def kb_update_command(
    src: Annotated[Path, typer.Argument(
        help="Folder of PEFT's method_comparison suite, one benchmark folder, or a folder of result files.",
        show_default=False)],
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="Knowledge folder to update (default: the bundled knowledge/data).",
        show_default=False)] = None,
    source_commit: Annotated[Optional[str], typer.Option(
        "--source-commit", help="huggingface/peft commit of the files when there is no SNAPSHOT_COMMIT file.",
        show_default=False)] = None,
) -> None:
    """Ingest new benchmark result files into the knowledge base and print what changed."""
    with _handled_errors():
        from peftpick.knowledge.extract import update_knowledge

        with _spinner(f"Reading result files under {src}..."):
            summary = update_knowledge(src, data_dir, source_commit=source_commit)
        typer.echo(summary.describe())


# ---------------------------------------------------------------------------------------------- models


@app.command("models")
def models_command(
    json_output: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """List the bundled model architectures (names to pass to --model)."""
    with _handled_errors():
        from peftpick.knowledge.architectures import load_registry
        from peftpick.knowledge.denoisers import load_denoiser_registry

        language, images = list(load_registry()), list(load_denoiser_registry())
        registry = [*language, *images]
        kinds = {id(e): "causal-lm" for e in language} | {id(e): "denoiser" for e in images}
        if json_output:
            entries = [
                {"name": e.name, "display_name": e.display_name, "family": e.family, "hub_id": e.hub_id,
                 "published_params": e.published_params, "aliases": list(e.aliases), "kind": kinds[id(e)]}
                for e in registry
            ]
            typer.echo(json.dumps(entries, indent=2))
            return

        from rich import box
        from rich.console import Console
        from rich.table import Table

        from peftpick.report.formatting import count

        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left",
                      title=f"{len(registry)} bundled models: {len(language)} language models, {len(images)} image "
                            "and video denoisers (params as published; - where not stated)")
        table.add_column("Name", no_wrap=True)
        table.add_column("Kind", no_wrap=True)
        table.add_column("Params", justify="right", no_wrap=True)
        table.add_column("Hub id", overflow="fold")
        for entry in registry:
            params = count(entry.published_params) if entry.published_params else "-"
            table.add_row(entry.name, "LM" if kinds[id(entry)] == "causal-lm" else "image/video", params,
                          entry.hub_id)
        Console().print(table)


# ----------------------------------------------------------------------------------------------- probe


@app.command("probe")
def probe_command(
    model: Annotated[str, typer.Option(
        "--model", "-m", help="Model: a local folder with weights, a hub id in the local cache, or a bundled name "
        "with --random-weights.", show_default=False)],
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="Training data: .jsonl/.json, .csv/.tsv, .parquet or .txt (default: built-in arithmetic "
        "problems).", metavar="FILE", show_default=False)] = None,
    methods: Annotated[Optional[str], typer.Option(
        "--methods", help="Comma-separated methods (default: lora,dora,lora-fa,oft,ia3,loha,vera,prompt-tuning for "
        "language models; lora,lora-r64,dora,oft,ia3,loha,lokr,vera for image models).",
        show_default=False)] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence (batches are packed to it).")] = 768,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Batch size per optimizer step (kept when a smaller micro-batch must be used).")] = 4,
    steps: Annotated[int, typer.Option(
        "--probe-steps", "--steps", help="Measured optimizer steps, after one warm-up step (the main command's "
        "--probe-steps; --steps is the same option).")] = 10,
    resolution: Annotated[Optional[int], typer.Option(
        "--resolution", help="Image and video models: pixels per side (default: the model's usual).",
        show_default=False)] = None,
    frames: Annotated[Optional[int], typer.Option(
        "--frames", help="Video models: frames per clip (default: the model's usual).", show_default=False)] = None,
    grad_ckpt: Annotated[bool, typer.Option(
        "--grad-ckpt", help="Start with gradient checkpointing on.")] = False,
    random_weights: Annotated[bool, typer.Option(
        "--random-weights", help="Build the model from its config with random weights (memory and speed only).")]
        = False,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="cuda, cuda:N or cpu (default: the GPU if there is one; the CPU measures no memory).",
        show_default=False)] = None,
    text_field: Annotated[Optional[str], typer.Option(
        "--text-field", help="Field holding the text (default: text).", show_default=False)] = None,
    prompt_field: Annotated[Optional[str], typer.Option(
        "--prompt-field", help="Field holding the prompt (with --response-field).", show_default=False)] = None,
    response_field: Annotated[Optional[str], typer.Option(
        "--response-field", help="Field holding the response (with --prompt-field).", show_default=False)] = None,
    learning_rate: Annotated[Optional[float], typer.Option(
        "--learning-rate", help="Learning rate for every method (default: each method's benchmark rate).",
        show_default=False)] = None,
    timeout: Annotated[Optional[float], typer.Option(
        "--timeout", help="Seconds allowed per probe once its process has started (default 1800).",
        show_default=False)] = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print the measurements as JSON (schema_version 1) and nothing else on stdout.")] = False,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Measure again: neither read nor write the probe cache.")] = False,
    gpus: Annotated[int, typer.Option(
        "--gpus", help="Run each probe under torchrun with FSDP2 on this many local GPUs (on the CPU: gloo "
        "processes); the peak is the busiest rank's.")] = 1,
    optimizer: Annotated[Optional[str], typer.Option(
        "--optimizer", help="adamw, adamw-8bit, paged-adamw-8bit (bitsandbytes), adafactor, sgd (momentum 0.9) or "
        "lora-fa (LoRA adapters only); default: each method's own (adamw; LoRA-FA always keeps its own).",
        show_default=False)] = None,
    quant: Annotated[str, typer.Option(
        "--quant", help="Quantize the frozen base with bitsandbytes: none, 4bit (NF4, double quantization), "
        "4bit-no-dq or 8bit (LLM.int8).")] = "none",
    loss: Annotated[str, typer.Option(
        "--loss", help="Loss kernel: stock, liger (Liger's fused linear cross-entropy; CUDA only, the CPU computes "
        "the stock loss and says so) or chunked (TRL's chunked LM head).")] = "stock",
    trainer: Annotated[str, typer.Option(
        "--trainer", help="Training loop: plain, hf (transformers' Trainer runs the steps) or trl (TRL's SFTTrainer; "
        "its chunked loss).")] = "plain",
) -> None:
    """Micro-train candidate methods on this machine's GPU and print measured peak memory, speed and loss slope."""
    import warnings

    with _handled_errors(), warnings.catch_warnings():
        from peftpick.probes import ProbesInterrupted, ProbeWarning, probe

        # what a run recovered from (e.g. a damaged cache replaced): one line on stderr, not a Python warning dump
        warnings.simplefilter("always", ProbeWarning)
        warnings.showwarning = lambda message, *_args, **_kwargs: typer.echo(f"warning: {message}", err=True)
        interrupted = False
        try:
            image = {key: value for key, value in (("resolution", resolution), ("frames", frames)) if value is not None}
            results = probe(model, methods, data, seq_len=seq_len, batch_size=batch_size, steps=steps, **image,
                            gradient_checkpointing=grad_ckpt, random_weights=random_weights, device=device,
                            cache=not no_cache, text_field=text_field, prompt_field=prompt_field,
                            response_field=response_field, learning_rate=learning_rate, timeout_s=timeout,
                            **({"gpus": gpus} if gpus != 1 else {}),
                            **{name: value for name, value in (("optimizer", optimizer), ("quant", quant),
                                                               ("loss", loss), ("trainer", trainer))
                               if value != {"optimizer": None, "quant": "none", "loss": "stock",
                                            "trainer": "plain"}[name]})
        except ProbesInterrupted as stopped:  # keep what finished: print it, then exit as interrupted
            results, interrupted = stopped.results, True
        from peftpick.probes.table import print_probe_table, probes_document

        if json_output:
            typer.echo(json.dumps(probes_document(model, results, interrupted), indent=2, allow_nan=False))
        elif results:
            from rich.console import Console

            print_probe_table(model, results, Console())
        if interrupted:
            typer.echo(f"interrupted: {len(results)} probe(s) finished and are cached", err=True)
            raise typer.Exit(EXIT_INTERRUPTED)
        if results and all(result.status == "error" for result in results):
            raise typer.Exit(1)  # nothing could be measured; the table says why


# ------------------------------------------------------------------------------------------ adapters

EXIT_DOES_NOT_LOAD = 1


def _progress_on_stderr() -> Callable[[str], None]:
    """Progress lines on stderr (stdout stays the result, or parseable JSON)."""
    return lambda message: typer.echo(f"... {message}", err=True)


@app.command("check")
def check_command(
    adapter: Annotated[Path, typer.Argument(help="The adapter folder (adapter_config.json + adapter_model.safetensors).",
                                            show_default=False)],
    serve: Annotated[str, typer.Option("--serve", help=f"The serving stack: {', '.join(s.value for s in Serve if s is not Serve.NONE)}.")]
        = Serve.VLLM.value,
    multi_adapter: Annotated[bool, typer.Option(
        "--multi-adapter", help="Several adapters are served over one base: only what loads as it is counts.")]
        = False,
    base: Annotated[Optional[str], typer.Option(
        "--base", help="The base model (folder, hub id or bundled name): also check the tensors against it.",
        show_default=False)] = None,
    engine: Annotated[bool, typer.Option(
        "--engine/--no-engine", help="Also run the engine's own validation when it is installed here (vLLM).")]
        = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON only.")] = False,
) -> None:
    """Say whether a serving stack loads a saved adapter as it is (exit 0), or what to do instead (exit 1)."""
    with _handled_errors():
        serve = _choice(serve, Serve, "--serve")
        if serve == Serve.NONE.value:
            raise PeftpickError("--serve none names no stack to check against",
                                f"pass one of {', '.join(s.value for s in Serve if s is not Serve.NONE)}")
        from peftpick.adapters.check import check_adapter
        from peftpick.report.adapters import check_lines, check_to_dict

        result = check_adapter(adapter, serve, multi_adapter=multi_adapter, base=base, run_engine=engine)
        if json_output:
            typer.echo(json.dumps(check_to_dict(result), indent=2, allow_nan=False))
        else:
            for line in check_lines(result):
                typer.echo(line)
    if not result.loads_as_is:
        raise typer.Exit(EXIT_DOES_NOT_LOAD)


@app.command("convert")
def convert_command(
    adapter: Annotated[Path, typer.Argument(help="The adapter folder to convert.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="New folder for the converted LoRA adapter.",
                                         show_default=False)],
    to: Annotated[str, typer.Option("--to", help="The target method: lora (PEFT LoRA).")] = "lora",
    fmt: Annotated[str, typer.Option(
        "--format", help="The file format: peft (adapter_config.json + adapter_model.safetensors), diffusers "
        "(the pipeline's load_lora_weights format, alpha kept as metadata) or kohya (one .safetensors for ComfyUI, "
        "Forge, InvokeAI, alpha per module).")] = "peft",
    pipeline: Annotated[Optional[str], typer.Option(
        "--pipeline", help="--format diffusers: the diffusers pipeline class (default: the base model's).",
        show_default=False)] = None,
    family: Annotated[Optional[str], typer.Option(
        "--family", help="--format kohya: the model family that sets the key prefix, e.g. flux, sdxl (default: the "
        "base model's).", show_default=False)] = None,
    rank: Annotated[Optional[int], typer.Option(
        "--rank", help="Rank of the converted adapter (SVD conversions; compresses exact ones further).",
        show_default=False)] = None,
    energy: Annotated[Optional[float], typer.Option(
        "--energy", help="Keep this share of each layer's squared singular values instead of a fixed rank, e.g. 0.99.",
        show_default=False)] = None,
    base: Annotated[Optional[str], typer.Option(
        "--base", help="The base model (folder with weights, or a hub id in the cache); default: the adapter's "
        "base_model_name_or_path when it is a local folder.", show_default=False)] = None,
    initial_adapter: Annotated[Optional[Path], typer.Option(
        "--initial-adapter", help="PiSSA / OLoRA / CorDA: the adapter saved before training (else recomputed "
        "from the base weights where that is exact).", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="dtype to load the base in: bfloat16, float16 or float32 (default: the checkpoint's; PiSSA / "
        "OLoRA: the dtype the adapter was trained in).", show_default=False)] = None,
    serve: Annotated[str, typer.Option("--serve", help="The stack whose launch flags to print for the result.")]
        = Serve.VLLM.value,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")] = False,
) -> None:
    """Convert an adapter into a plain LoRA adapter that a serving stack loads, with the error it costs."""
    with _handled_errors():
        if to.strip().lower() != "lora":
            raise PeftpickError(f"--to {to} is not a method peftpick converts to", "use --to lora")
        _check_dtype(dtype)
        fmt = fmt.strip().lower()
        if fmt not in ("peft", "diffusers", "kohya"):
            raise PeftpickError(f"unknown --format {fmt!r}", "use peft, diffusers or kohya")
        if fmt != "peft":
            from peftpick.adapters.convert import export_adapter
            from peftpick.report.adapters import export_lines, export_to_dict

            conversion, written = export_adapter(adapter, output, fmt, rank=rank, energy=energy, base=base,
                                                 initial_adapter=initial_adapter, dtype=dtype, pipeline=pipeline,
                                                 family=family, progress=_progress_on_stderr())
            if json_output:
                typer.echo(json.dumps(export_to_dict(conversion, written), indent=2, allow_nan=False))
            else:
                for line in export_lines(conversion, written):
                    typer.echo(line)
            return
        serve = _choice(serve, Serve, "--serve")
        from peftpick.adapters.convert import convert_adapter
        from peftpick.report.adapters import conversion_lines, conversion_to_dict

        result = convert_adapter(adapter, output, rank=rank, energy=energy, base=base, dtype=dtype,
                                 initial_adapter=initial_adapter, progress=_progress_on_stderr())
        launch = _launch_after(result.output, serve, base)
        if json_output:
            typer.echo(json.dumps(conversion_to_dict(result, launch), indent=2, allow_nan=False))
        else:
            for line in conversion_lines(result, launch):
                typer.echo(line)


@app.command("merge")
def merge_command(
    adapter: Annotated[Path, typer.Argument(help="The adapter folder to merge.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="New folder for the merged model.",
                                         show_default=False)],
    base: Annotated[Optional[str], typer.Option(
        "--base", help="The base model (folder with weights, or a hub id in the cache); default: the adapter's "
        "base_model_name_or_path when it is a local folder.", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="dtype of the merged weights: bfloat16, float16 or float32 (default: the base's).",
        show_default=False)] = None,
    serve: Annotated[str, typer.Option("--serve", help="The stack whose launch command to print.")]
        = Serve.VLLM.value,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")] = False,
) -> None:
    """Merge an adapter into its base model (merge_and_unload) and save the merged model as safetensors."""
    with _handled_errors():
        serve = _choice(serve, Serve, "--serve")
        _check_dtype(dtype)
        from peftpick.adapters.merge import merge_adapter
        from peftpick.report.adapters import merge_lines, merge_to_dict

        result = merge_adapter(adapter, base, output, dtype=dtype, progress=_progress_on_stderr())
        launch = _model_launch(result.output, serve)
        if json_output:
            typer.echo(json.dumps(merge_to_dict(result, launch), indent=2, allow_nan=False))
        else:
            for line in merge_lines(result, launch):
                typer.echo(line)


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in ("bfloat16", "float16", "float32"):
        raise PeftpickError(f"unknown --dtype {dtype!r}", "use bfloat16, float16 or float32")


def _launch_after(folder: Path, serve: str, base: str | None) -> tuple[str, ...]:
    """Launch commands for a converted adapter (peftpick's own check of the result)."""
    if serve == Serve.NONE.value:
        return ()
    from peftpick.adapters.check import check_adapter

    result = check_adapter(folder, serve, base=base, run_engine=False)
    return result.verdict.launch if result.loads_as_is else result.fix


def _model_launch(folder: Path, serve: str) -> tuple[str, ...]:
    """The stack's command for a plain model folder."""
    if serve == Serve.NONE.value:
        return ()
    from peftpick.knowledge import KnowledgeBase
    from peftpick.knowledge.serving import model_launch

    return model_launch(KnowledgeBase.load().stack(serve), str(folder))


# ------------------------------------------------------------------------------------------------ entry


def main() -> NoReturn:
    """Entry point of the `peftpick` script."""
    import logging

    # bitsandbytes logs at import that its CPU 4-bit kernels are missing: this process only traces on the meta
    # device (probes run in their own processes), so the line is noise on every run
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        app()
        code: Any = 0
    except SystemExit as done:
        code = done.code
    except KeyboardInterrupt:  # before a command's own handler is in place (e.g. while parsing)
        typer.echo("interrupted", err=True)
        code = EXIT_INTERRUPTED
    _exit_without_teardown(code)


def _exit_without_teardown(code: Any) -> NoReturn:
    """Leave as sys.exit(code) would, without the interpreter's teardown of every imported module: with torch,
    transformers and PEFT loaded that takes about 2 s on a small CPU and frees nothing the operating system does not
    free anyway. Everything a normal exit does that matters runs first: the exit handlers (multiprocessing's, the
    logging flush, temporary folders' finalizers) and the flush of both streams; the command's own files and
    caches are closed by then."""
    import atexit
    import os

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message") prints the message and exits 1
        print(code, file=sys.stderr)
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)


if __name__ == "__main__":
    main()
