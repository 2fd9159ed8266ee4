"""A stand-in for `python -m peftpick.probes.worker` that speaks the same protocol in milliseconds (no torch).

Tests of the parent's side (cache, CLI, crashes, timeouts, retries when nothing fits) run it instead of the real
worker, whose imports take seconds; the real worker is tested in test_probes.py on a tiny model.

STAND_IN_PLAN (JSON, by method key): {"kind": "ok" | "oom" | "crash" | "hang"}; "ok" when absent.
STAND_IN_LOG: a file that gets one JSON line per job run (method and setting), for counting.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events-fd", type=int, required=True)
    events = os.fdopen(parser.parse_args().events_fd, "w", buffering=1)

    def send(**message) -> None:
        events.write(json.dumps(message) + "\n")

    send(event="ready", at=time.time(), import_seconds=0.0)
    line = sys.stdin.readline().strip()
    if not line:
        return 0
    with open(line, "rb") as handle:
        job = pickle.load(handle)
    send(event="started", at=time.time())
    shape = job.shape
    if os.environ.get("STAND_IN_LOG"):
        with open(os.environ["STAND_IN_LOG"], "a") as log:
            log.write(json.dumps({"method": job.candidate.method, "batch_size": shape.batch_size,
                                  "checkpointing": shape.gradient_checkpointing}) + "\n")
    kind = json.loads(os.environ.get("STAND_IN_PLAN", "{}")).get(job.candidate.method, {}).get("kind", "ok")
    if kind == "crash":
        print("stand-in: about to crash", file=sys.stderr, flush=True)
        os._exit(3)
    if kind == "hang":  # one step, then nothing
        send(event="step", step=1, of=job.total_steps, loss=3.0, peak_allocated=None, seconds=0.01)
        time.sleep(3600)
    if kind == "oom":
        send(event="result", status="oom", error="OutOfMemoryError: stand-in", losses=[], phases={})
        return 0
    losses = []
    for step in range(1, job.total_steps + 1):
        losses.append(3.0 - 0.1 * step)
        send(event="step", step=step, of=job.total_steps, loss=losses[-1], peak_allocated=None, seconds=0.01)
    send(event="result", status="ok", losses=losses, step_seconds=0.01,
         tokens_per_second=job.tokens_per_step / 0.01, trainable=10, total=100,
         versions={"torch": "stand-in", "transformers": "stand-in", "peft": "stand-in"},
         phases={"load": 0.0, "steps": 0.01})
    return 0


if __name__ == "__main__":
    sys.exit(main())
