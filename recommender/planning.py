"""Find training settings that fit the VRAM, keeping the requested effective batch.

Order tried (the cheapest change first, as the probes do): the requested batch without gradient checkpointing,
with it, then halving the micro-batch with gradient accumulation. Each setting's peak comes from the memory
estimator; estimates are shared between candidates whose memory cannot differ (PiSSA and OLoRA change LoRA's
initial values, rsLoRA and alpha its scale, none of them a tensor's size).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.types import GIB, Architecture, Candidate, Fit, MemoryEstimate, Quant, TrainingPlan, TrainingShape

# Memory a CUDA process holds outside PyTorch's allocator: the CUDA context, cuBLAS/cuDNN handles, kernels.
# About 0.5-0.6 GiB on Hopper with torch 2.x; the fit check adds it to the estimated peak reserved.
CONTEXT_RESERVE_BYTES = int(0.6 * GIB)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# A candidate that fits with checkpointing is estimated without it when its checkpointed peak plus this share
# of what checkpointing saved plain LoRA could fit: checkpointing saves about as much for every adapter (the
# base model's activations), a little less for some.
PLAIN_RETRY_SHARE = 0.9
# "fits" leaves this share of the card free for fragmentation that the estimate does not foresee.
FIT_HEADROOM = 0.05

Estimator = Callable[[Architecture, Any, TrainingShape], MemoryEstimate]


def fit_of(estimate: MemoryEstimate, vram_gib: float) -> Fit:
    need = estimate.peak_reserved_bytes + CONTEXT_RESERVE_BYTES
    budget = vram_gib * GIB
    if need <= budget * (1 - FIT_HEADROOM):
        return "fits"
    if need <= budget:
        return "marginal"
    return "does not fit"


def memory_signature(candidate: Candidate) -> tuple:
    """What decides a candidate's memory: its PEFT config minus the fields that only change values."""
    ignored = {"init_lora_weights", "use_rslora", "lora_alpha", "alpha_pattern", "lora_dropout"}
    kwargs = tuple(sorted((k, repr(v)) for k, v in candidate.peft_kwargs.items() if k not in ignored))
    return (candidate.peft_config_class, kwargs, candidate.optimizer)


def _traceable_config(candidate: Candidate):
    """The PEFT config the estimator traces. Data-dependent initialisations (PiSSA's SVD, OLoRA's QR) cannot
    run on the meta device and allocate nothing that outlives wrapping, so LoRA's default init stands in."""
    config = candidate.peft_config()
    if config is not None and getattr(config, "init_lora_weights", True) not in (True, False, "gaussian"):
        config = copy.copy(config)
        config.init_lora_weights = True
    return config


class Planner:
    """Plans candidates for one request. Holds the estimates made so far (for this request only)."""

    def __init__(self, arch: Architecture, vram_gib: float, batch_size: int, seq_len: int, quant: Quant,
                 estimator: Estimator | None = None, base_shape: TrainingShape | None = None,
                 loss_lever: bool = False, cache: Any = None, gpus: int = 1, strategies: tuple = (),
                 optimizer: str | None = None, optimizer_lever: bool = False):
        """`base_shape`: what every planned setting keeps (a denoiser's resolution, frames, cached inputs, the
        dtype, the loop); the planner sets micro-batch, accumulation, checkpointing and the optimizer.
        `loss_lever`: the planner may switch the stock loss to Liger's fused cross-entropy, which drops the full
        logits at no cost in quality or speed, when the stock loss does not fit without checkpointing.
        `cache`: an open estimator.cache.EstimateCache; estimates are read from it before tracing and written to
        it after (only with the default estimator: another one's figures are not the tracer's).
        `gpus`, `strategies`: every estimate is turned into the per-GPU figures of the first of `strategies`
        (cheapest first, estimator.sharding.COST_ORDER) that fits on `gpus` GPUs of `vram_gib` each, else of the
        one with the lowest peak; the trace itself is of one process, so it is made (and cached) once.
        `optimizer`: every candidate trains with it (LoRA-FA keeps its own); None: each candidate's own (AdamW).
        `optimizer_lever`: a candidate on AdamW that fits in no setting is planned again with bitsandbytes' 8-bit
        AdamW (its two moments one byte each: half of AdamW's state for bf16 weights, a quarter for fp32 ones). It
        comes after checkpointing and smaller micro-batches because the benchmark runs, and so the quality
        figures, used AdamW."""
        self.arch = arch
        self.vram_gib = vram_gib
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.quant = quant
        self._estimator = estimator or _default_estimator
        self._base_shape = base_shape or TrainingShape(seq_len=seq_len)
        self._estimates: dict[tuple, MemoryEstimate | PeftpickError] = {}
        self._cache = cache if estimator is None else None
        self._disk_keys: dict[tuple, tuple[str, dict]] = {}  # planner key -> (cache row key, its parts)
        self.cached_estimates = 0  # how many estimates came from the cache
        self._loss_lever = loss_lever
        self.loss_saving_bytes: int | None = None  # what Liger saved plain LoRA, once the lever is pulled
        self.gpus = gpus
        self.strategies = tuple(strategies) or (("single",) if gpus == 1 else ("ddp",))
        self.optimizer = optimizer
        self._optimizer_lever = optimizer_lever

    def optimizer_of(self, candidate: Candidate) -> str:
        """The optimizer `candidate` is planned with before any lever."""
        return candidate.optimizer if self.optimizer is None or candidate.optimizer == "lora-fa" else self.optimizer

    def settings(self, checkpointing: bool = True, plain_first: bool = True) -> list[tuple[int, bool]]:
        """(micro-batch, gradient checkpointing) in the order tried: the requested batch without and with
        checkpointing, then halved micro-batches (with checkpointing where the method allows it)."""
        tried = [(self.batch_size, False)] if plain_first or not checkpointing else []
        if checkpointing:
            tried.append((self.batch_size, True))
        micro = self.batch_size
        while micro > 1:
            micro = (micro + 1) // 2
            tried.append((micro, checkpointing))
        return tried

    def plan(self, candidate: Candidate) -> TrainingPlan:
        """The first setting that fits; else the first that fits marginally; else the cheapest one tried."""
        return self.plan_all([candidate])[candidate.method]

    def plan_all(self, candidates: list[Candidate], progress: Callable[[str], None] | None = None,
                 pool: WorkerPool | int = 1) -> dict[str, TrainingPlan | PeftpickError]:
        """Plans for many candidates, estimated on the pool's workers (an int starts a pool of that many). Each
        candidate's next, cheaper setting is submitted as soon as its last estimate is known, so one slow method
        never holds the others back. A candidate whose settings cannot be built or traced maps to the
        PeftpickError saying why.

        When the first candidate (LoRA in the catalogue) does not fit without gradient checkpointing, the
        others start with it, and are estimated without it only where their checkpointed peak plus
        PLAIN_RETRY_SHARE of what checkpointing saved LoRA could still fit: a round of hopeless estimates is
        skipped.
        """
        result: dict[str, TrainingPlan | PeftpickError] = {}
        hopeless = {c.method: plan for c in candidates if (plan := self._hopeless_full_fine_tuning(c)) is not None}
        result.update(hopeless)
        candidates = [c for c in candidates if c.method not in hopeless]
        if not candidates:
            return result
        # a pool handed in is the caller's to close: its forked workers serve later plan_all calls too
        with contextlib.nullcontext(pool) if isinstance(pool, WorkerPool) else WorkerPool(pool) as workers:
            self._choose_loss(candidates, workers, progress)
            reference, plain = self._plain_reference(candidates, workers, progress)
            plain_first = not isinstance(plain, MemoryEstimate) or fit_of(plain, self.vram_gib) == "fits"
            # what checkpointing saved the reference, needed only when it starts checkpointed: known once its
            # checkpointed estimate (the first asked for below) is back; candidates that need it before wait
            saving: float | None = None
            saving_known = plain_first
            deferred: list[tuple[Candidate, int, bool, MemoryEstimate]] = []
            queues = {c.method: list(self.settings(can_checkpoint(c), plain_first)) for c in candidates}
            found: dict[str, TrainingPlan] = {}  # best plan so far
            first_tried: dict[str, MemoryEstimate] = {}  # each candidate's first estimate with its own optimizer
            scheduler = _Scheduler(self, workers, progress)

            def decide(candidate: Candidate, micro: int, ckpt: bool, outcome: MemoryEstimate) -> None:
                """Keep the better plan and ask for the candidate's next setting, if any is worth estimating."""
                method = candidate.method
                lever = outcome.shape.optimizer != self.optimizer_of(candidate)
                if not lever:
                    first_tried.setdefault(method, outcome)
                plan = TrainingPlan(micro, outcome.shape.gradient_accumulation, ckpt, outcome,
                                    fit_of(outcome, self.vram_gib), outcome.shape.loss,
                                    self.loss_saving_bytes if outcome.shape.loss == "liger" else None,
                                    _optimizer_saving(first_tried.get(method), outcome) if lever else None)
                found[method] = _better(plan, found.get(method), self._strategy_rank)
                if plan.fit != "fits":
                    if not _may_fit(_fixed_bytes(outcome), self.vram_gib):
                        queues[method] = []  # weights, gradients and optimizer state alone exceed the VRAM
                elif self._strategy_rank(plan) > 0 and queues[method]:
                    pass  # a cheaper strategy may fit with the next, smaller setting: keep going
                else:
                    worth_plain = (ckpt and micro == self.batch_size and not plain_first and saving is not None
                                   and _may_fit(outcome.peak_reserved_bytes + PLAIN_RETRY_SHARE * saving, self.vram_gib))
                    queues[method] = [(micro, False, outcome.shape.optimizer)] if worth_plain else []
                if not queues[method] and not lever and self._wants_8bit(candidate, found[method]):
                    queues[method] = [(m, c, EIGHT_BIT_ADAMW) for m, c in self.settings(can_checkpoint(candidate))]
                if queues[method]:
                    # on to the next setting, ahead of candidates not started: a slow method's last estimate
                    # then runs beside the others instead of after them
                    scheduler.request(candidate, *queues[method].pop(0), first=True)

            for candidate in candidates:
                scheduler.request(candidate, *queues[candidate.method].pop(0))
            for candidate, micro, ckpt, outcome in scheduler.outcomes():
                failed = isinstance(outcome, PeftpickError)
                if failed:
                    result[candidate.method] = outcome
                ready = [] if failed else [(candidate, micro, ckpt, outcome)]
                first_setting = ckpt and micro == self.batch_size
                if not saving_known and candidate is reference and first_setting:
                    saving_known = True
                    if not failed and isinstance(plain, MemoryEstimate):
                        saving = plain.peak_reserved_bytes - outcome.peak_reserved_bytes
                    ready += deferred
                    deferred = []
                elif not saving_known and ready and first_setting and fit_of(outcome, self.vram_gib) == "fits":
                    deferred += ready  # whether to retry it without checkpointing needs the saving
                    ready = []
                for waiting in ready:
                    decide(*waiting)
        for method, plan in found.items():
            result.setdefault(method, plan)
        return result

    def _wants_8bit(self, candidate: Candidate, plan: TrainingPlan) -> bool:
        """Whether the optimizer lever applies: it may, the candidate trains with AdamW and fits in no setting
        tried, and what the optimizer holds at the peak (its state and the step's temporaries, more than 8 bits can
        save) is large enough to change that, and the weights, gradients and two bytes of 8-bit state per trainable
        weight alone would fit."""
        if not self._optimizer_lever or self.optimizer_of(candidate) != "adamw" or plan.fit != "does not fit":
            return False
        estimate = plan.estimate
        optimizer = estimate.breakdown.get("optimizer", 0)
        if not _may_fit(estimate.peak_reserved_bytes - optimizer, self.vram_gib):
            return False
        # 8-bit AdamW still keeps its own state beside the weights and gradients
        eight_bit_state = _state_bytes_per_weight(EIGHT_BIT_ADAMW, width=0)[0] * estimate.trainable_params
        return _may_fit(_fixed_bytes(estimate) - optimizer + eight_bit_state, self.vram_gib)

    def _hopeless_full_fine_tuning(self, candidate: Candidate) -> TrainingPlan | None:
        """Full fine-tuning whose weights, gradients and the least optimizer state it could train with alone exceed
        the VRAM: no micro-batch, checkpointing or optimizer lever can change that, so it is not traced; the plan
        carries that lower bound, marked as one."""
        if candidate.peft_config_class is not None or self.gpus > 1:  # sharding divides the bound
            return None
        from peftpick.workloads import workload_of

        parameters = int(workload_of(self.arch).hook("count_parameters")(self.arch))
        width = _DTYPE_BYTES.get(str(self._base_shape.dtype).removeprefix("torch."), 4)
        optimizer = self.optimizer_of(candidate)
        if optimizer == "adamw" and self._optimizer_lever:
            optimizer = EIGHT_BIT_ADAMW  # the least the lever could switch it to
        state, state_words = _state_bytes_per_weight(optimizer, width)
        bound = int(parameters * (2 * width + state))
        if _may_fit(bound, self.vram_gib):
            return None
        shape = self._shape(candidate, 1, can_checkpoint(candidate))
        held = f"weights, gradients and {state_words}" if state else "weights and gradients"
        estimate = MemoryEstimate(
            peak_allocated_bytes=bound, peak_reserved_bytes=bound,
            breakdown={"weights": parameters * width, "grads": parameters * width,
                       **({"optimizer": int(parameters * state)} if state else {})},
            trainable_params=parameters, total_params=parameters, shape=shape,
            adapter_file_bytes=parameters * width,
            assumptions=(f"not traced: the {parameters:,} weights, their gradients in {shape.dtype}"
                         + (f" and {state_words} ({state:g} bytes per weight)" if state else "")
                         + f" alone take {bound / GIB:.1f} GiB, more than the {self.vram_gib:g} GiB GPU; "
                         + ("activations" if state else "optimizer state and activations") + " come on top",),
            source=f"{LOWER_BOUND}{held}{NOT_TRACED}",
        )
        return TrainingPlan(1, shape.gradient_accumulation, shape.gradient_checkpointing, estimate, "does not fit")

    def _choose_loss(self, candidates, pool, progress) -> None:
        """With the lever: when plain LoRA at the requested batch without checkpointing does not fit with the
        stock loss, every candidate is planned with Liger's fused cross-entropy (it only removes memory). Both
        losses and Liger with checkpointing are estimated at once (the last is the next question either way)."""
        reference = next((c for c in candidates if can_checkpoint(c)), None)
        if not self._loss_lever or reference is None or self._base_shape.loss != "stock":
            return
        scheduler = _Scheduler(self, pool, progress)
        for ckpt, loss in ((False, "stock"), (False, "liger"), (True, "liger")):
            scheduler.request(reference, self.batch_size, ckpt, loss=loss)
        outcomes = {(o[2], o[3].shape.loss if not isinstance(o[3], PeftpickError) else None): o[3]
                    for o in scheduler.outcomes()}
        stock, liger = outcomes.get((False, "stock")), outcomes.get((False, "liger"))
        if not isinstance(stock, MemoryEstimate) or fit_of(stock, self.vram_gib) == "fits":
            return
        self._base_shape = dataclasses.replace(self._base_shape, loss="liger")
        if isinstance(liger, MemoryEstimate):
            self.loss_saving_bytes = stock.peak_reserved_bytes - liger.peak_reserved_bytes

    def _plain_reference(self, candidates, pool, progress) -> tuple[Candidate | None, MemoryEstimate | PeftpickError | None]:
        """The first candidate that can checkpoint (LoRA in the catalogue) and its estimate at the requested batch
        without checkpointing: whether it fits decides whether every candidate tries that setting first."""
        reference = next((c for c in candidates if can_checkpoint(c)), None)
        if reference is None:
            return None, None
        scheduler = _Scheduler(self, pool, progress)
        scheduler.request(reference, self.batch_size, False)
        return reference, next(outcome for _, _, _, outcome in scheduler.outcomes())

    def _from_disk(self, key: tuple, shape: TrainingShape) -> MemoryEstimate | PeftpickError | None:
        """The cached outcome for planner key `key` (estimated at `shape`), or None (then remembered for `_to_disk`)."""
        if self._cache is None:
            return None
        row_key, parts = self._cache.key(self.arch, key[0], shape)
        outcome = self._cache.get(row_key)
        if outcome is None:
            self._disk_keys[key] = (row_key, parts)
        else:
            self.cached_estimates += 1
        return outcome

    def _to_disk(self, key: tuple, outcome: MemoryEstimate | PeftpickError) -> None:
        if self._cache is not None and key in self._disk_keys:
            row_key, parts = self._disk_keys.pop(key)
            self._cache.put(row_key, outcome, parts, self.arch.name)

    def _known(self, key: tuple, candidate: Candidate, micro: int, ckpt: bool) -> MemoryEstimate | PeftpickError:
        known = self._estimates[key]
        if isinstance(known, PeftpickError):
            return known
        return self._placed(dataclasses.replace(known, shape=self._shape(candidate, micro, ckpt, *key[-2:])))

    def _strategy_rank(self, plan: TrainingPlan) -> int:
        """0 for the cheapest strategy the planner may use, 1 for the next, ..."""
        names = [getattr(s, "value", s) for s in self.strategies]
        return names.index(plan.strategy) if plan.strategy in names else 0

    def _placed(self, estimate: MemoryEstimate) -> MemoryEstimate | PeftpickError:
        """The per-GPU estimate of the cheapest strategy that fits (one GPU: the estimate itself)."""
        if self.gpus == 1:
            return estimate
        from peftpick.estimator.sharding import per_gpu

        best: MemoryEstimate | None = None
        for strategy in self.strategies:
            try:
                placed = per_gpu(estimate, self.arch, self.gpus, strategy)
            except PeftpickError as error:
                return error
            fit = fit_of(placed, self.vram_gib)
            if fit == "fits":
                return placed
            if best is None or (_FIT_ORDER[fit], placed.peak_reserved_bytes) < (
                    _FIT_ORDER[fit_of(best, self.vram_gib)], best.peak_reserved_bytes):
                best = placed
        assert best is not None
        return best

    def _shape(self, candidate: Candidate, micro: int, ckpt: bool, loss: str | None = None,
               optimizer: str | None = None) -> TrainingShape:
        return dataclasses.replace(self._base_shape, batch_size=micro, seq_len=self.seq_len,
                                   gradient_checkpointing=ckpt, gradient_accumulation=-(-self.batch_size // micro),
                                   optimizer=optimizer or self.optimizer_of(candidate),
                                   loss=loss or self._base_shape.loss)


class _Scheduler:
    """Estimates requested one setting at a time, shared between candidates whose memory cannot differ, handed
    back as they finish (in submission order when estimating in this process)."""

    def __init__(self, planner: Planner, pool: WorkerPool, progress: Callable[[str], None] | None):
        self.planner = planner
        self.pool = pool
        self.progress = progress
        self.waiting: dict[tuple, list[tuple[Candidate, int, bool]]] = {}
        self.ready: list[tuple[Candidate, int, bool, MemoryEstimate | PeftpickError]] = []

    def request(self, candidate: Candidate, micro: int, ckpt: bool, optimizer: str | None = None,
                first: bool = False, loss: str | None = None) -> None:
        """Ask for the estimate of one setting (`loss`, `optimizer`: other than the planner's current ones)."""
        planner = self.planner
        key = (memory_signature(candidate), micro, ckpt, loss or planner._base_shape.loss,
               optimizer or planner.optimizer_of(candidate))
        if key in planner._estimates:
            self.ready.append((candidate, micro, ckpt, planner._known(key, candidate, micro, ckpt)))
        elif key in self.waiting:
            self.waiting[key].append((candidate, micro, ckpt))
        else:
            shape = planner._shape(candidate, micro, ckpt, *key[-2:])
            cached = planner._from_disk(key, shape)
            if cached is not None:  # no trace, and no PEFT config built (nothing imports torch)
                planner._estimates[key] = cached
                self.ready.append((candidate, micro, ckpt, planner._known(key, candidate, micro, ckpt)))
                return
            self.waiting[key] = [(candidate, micro, ckpt)]
            label = (f"{candidate.display_name}, micro-batch {micro}{', checkpointing' if ckpt else ''}"
                     + (f", {shape.optimizer}" if shape.optimizer != candidate.optimizer else ""))
            self.pool.submit(planner._estimator, (planner.arch, _traceable_config(candidate), shape), label, key,
                             first)

    def outcomes(self):
        """(candidate, micro-batch, checkpointing, estimate or error) until nothing is requested any more; the
        caller may request more while iterating."""
        planner = self.planner
        while self.ready or self.waiting:
            if self.ready:
                yield self.ready.pop(0)
                continue
            key, outcome = self.pool.next_completed(self.progress)
            planner._estimates[key] = outcome
            planner._to_disk(key, outcome)
            for candidate, micro, ckpt in self.waiting.pop(key):
                self.ready.append((candidate, micro, ckpt, planner._known(key, candidate, micro, ckpt)))


def can_checkpoint(candidate: Candidate) -> bool:
    """PEFT refuses gradient checkpointing with prefix tuning (its past key values are not recomputable)."""
    return candidate.peft_type != "PREFIX_TUNING"


EIGHT_BIT_ADAMW = "adamw-8bit"
# bitsandbytes' 8-bit AdamW: exp_avg and exp_avg_sq as uint8 per element (bitsandbytes/optim/optimizer.py
# Optimizer2State.init_state); tensors under its min_8bit_size stay 32-bit, so this is a lower bound
EIGHT_BIT_STATE_BYTES = 2


def _state_bytes_per_weight(optimizer: str, width: int) -> tuple[float, str]:
    """GPU bytes of optimizer state per trained weight of `width` bytes that `optimizer` keeps at least, and its
    words: torch's AdamW two moments like the weights, SGD one momentum buffer, 8-bit AdamW two bytes; a paged
    optimizer can move its state off the GPU and Adafactor factors it, so those bound nothing."""
    return {"adamw": (2 * width, "AdamW's two moments"), "sgd": (width, "SGD's momentum"),
            EIGHT_BIT_ADAMW: (EIGHT_BIT_STATE_BYTES, "8-bit AdamW's two moments")}.get(optimizer, (0, ""))


# An estimate that is a lower bound, not a trace: its source reads LOWER_BOUND + what it holds + NOT_TRACED
LOWER_BOUND, NOT_TRACED = "lower bound: ", ", not traced"


def lower_bound_held(estimate: MemoryEstimate) -> str | None:
    """What a lower-bound estimate holds ("weights, gradients and ..."), or None for a traced or measured one."""
    source = estimate.source
    return source.removeprefix(LOWER_BOUND).removesuffix(NOT_TRACED) if source.startswith(LOWER_BOUND) else None


def _optimizer_saving(adamw: MemoryEstimate | None, eight_bit: MemoryEstimate) -> int | None:
    """Optimizer-state bytes 8-bit AdamW saved against AdamW (None when AdamW was not estimated)."""
    if adamw is None:
        return None
    return _state_bytes(adamw) - _state_bytes(eight_bit)


def _state_bytes(estimate: MemoryEstimate) -> int:
    """The optimizer's state after its first step (traced; else the optimizer part at the peak)."""
    return int(estimate.layout.get("optimizer_state") or estimate.breakdown.get("optimizer", 0))


def _fixed_bytes(estimate: MemoryEstimate) -> int:
    """What no smaller micro-batch or checkpointing can shrink: weights, adapter, gradients, optimizer state."""
    return sum(estimate.breakdown.get(part, 0) for part in ("weights", "adapter", "grads", "optimizer"))


def _may_fit(reserved_bytes: float, vram_gib: float) -> bool:
    return reserved_bytes + CONTEXT_RESERVE_BYTES <= vram_gib * GIB


_FIT_ORDER = {"fits": 0, "marginal": 1, "does not fit": 2}


def _better(new: TrainingPlan, old: TrainingPlan | None,
            strategy_rank: Callable[[TrainingPlan], int] = lambda _plan: 0) -> TrainingPlan:
    """The plan to keep: a better fit wins; at equal fit the cheaper multi-GPU strategy (`strategy_rank`, lower
    is cheaper), then the faster setting (no checkpointing, then the larger micro-batch)."""
    if old is None:
        return new
    if _FIT_ORDER[new.fit] != _FIT_ORDER[old.fit]:
        return new if _FIT_ORDER[new.fit] < _FIT_ORDER[old.fit] else old
    if new.fit == "does not fit":
        # among plans that do not fit, report the cheapest one tried
        return new if new.estimate.peak_reserved_bytes < old.estimate.peak_reserved_bytes else old
    if strategy_rank(new) != strategy_rank(old):
        return new if strategy_rank(new) < strategy_rank(old) else old
    speed = lambda p: (not p.gradient_checkpointing, p.micro_batch)  # noqa: E731
    return new if speed(new) > speed(old) else old


def _default_estimator(arch: Architecture, peft_config: Any, shape: TrainingShape) -> MemoryEstimate:
    from peftpick.workloads import workload_of

    estimate = workload_of(arch).hook("estimate")
    return estimate(arch, peft_config, dataclasses.replace(shape, gradient_accumulation=1))


def _guarded(estimator: Estimator, job) -> MemoryEstimate | PeftpickError:
    """Run one estimate; a method the tracer cannot run on this architecture becomes an explained error."""
    try:
        return estimator(*job)
    except PeftpickError as error:
        return error
    except (NotImplementedError, RuntimeError, ValueError, TypeError) as error:
        arch, config, _shape = job
        kind = type(config).__name__ if config is not None else "full fine-tuning"
        return PeftpickError(f"{kind} could not be set up on {arch.name}: {str(error).splitlines()[0][:200]}",
                             "pick another method, or report the model and method to peftpick")


class WorkerPool:
    """Runs estimate jobs: in this process, or in forked worker processes, which inherit the imported torch,
    transformers and PEFT and so start in milliseconds.

    Forking is safe only while this process has never run a multi-threaded CPU op (OpenMP's thread pool does
    not survive a fork). Tracing runs on the meta device, and the little CPU work it does (PEFT initialising a
    few adapter weights) runs on one thread (estimator.training), so a process that only estimates stays safe;
    a process that has run CPU work with several threads (torch.get_num_threads() > 1 and parallel ops done) must
    use workers=1, which `recommend` defaults to outside the command line.

    The first estimate runs in this process and the workers are forked after it: they inherit the modules it
    loaded lazily and the tracer's operator results, which a worker forked cold would each rebuild (a cold worker's
    first estimates take about twice as long).
    """

    def __init__(self, workers: int = 1):
        self.workers = workers
        self._executor = None
        self._submitted: list[tuple[Any, Any, str, Any]] = []  # in-process: (estimator, job, label, key) to run
        self._futures: dict[Any, tuple[str, Any]] = {}  # workers: future -> (label, key)
        self._in_process_done = 0  # estimates run here; the workers are forked after the first

    def __enter__(self) -> WorkerPool:
        return self

    def _start_workers(self) -> None:
        import multiprocessing
        import sys

        if self._executor is None and self.workers > 1 and sys.platform == "linux" and self._in_process_done:
            from concurrent.futures import ProcessPoolExecutor

            self._executor = ProcessPoolExecutor(max_workers=self.workers,
                                                 mp_context=multiprocessing.get_context("fork"))

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None  # a later use forks new workers rather than submitting to closed ones

    def submit(self, estimator: Estimator, job, label: str, key: Any, first: bool = False) -> None:
        """Queue one estimate (`first`: ahead of those queued); `next_completed` hands it back with `key`.
        Workers get a job only when one is free, so a job queued `first` starts next."""
        entry = (estimator, job, label, key)
        self._submitted.insert(0, entry) if first else self._submitted.append(entry)
        self._dispatch()

    def _dispatch(self) -> None:
        self._start_workers()
        while self._executor is not None and self._submitted and len(self._futures) < self.workers:
            estimator, job, label, key = self._submitted.pop(0)
            self._futures[self._executor.submit(_guarded, estimator, job)] = (label, key)

    def next_completed(self, progress: Callable[[str], None] | None) -> tuple[Any, MemoryEstimate | PeftpickError]:
        """(key, outcome) of a submitted estimate: the first to finish on workers, the oldest in this process."""
        if self._executor is None:
            estimator, job, label, key = self._submitted.pop(0)
            if progress:
                progress(f"estimating {label}")
            outcome = _guarded(estimator, job)
            self._in_process_done += 1
            self._dispatch()  # the queued rest goes to the workers, forked now
            return key, outcome
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(self._futures, return_when=FIRST_COMPLETED)
        future = min(done, key=lambda f: list(self._futures).index(f))  # ties: the oldest first
        label, key = self._futures.pop(future)
        self._dispatch()
        if progress:
            progress(f"estimated {label}")
        return key, future.result()



