"""The main command's wall time against the import floor, cold and warm, measured side by side.

    python benchmarks/command_speed.py [--repeats 3] [--json benchmarks/results/command-speed-cpu.json]
        [--beside "peftpick arguments"] [-- peftpick arguments]    (default: --model llama-3.2-3b --vram 16 --serve vllm)

For each repeat, in this order: the import floor (`python -c "import torch, transformers, peft, sklearn, pandas,
rich"`), the command with an empty cache folder (cold: every estimate traced), the same command again on that
folder (warm: every estimate read back; torch must not be imported, which the script checks with
`python -X importtime`). Prints each time, the medians and the ratios cold / floor and warm / floor (goals: at
most 1.3 and 0.5). Each run is a fresh process, as a user's would be; the machine's other load is not controlled,
so compare ratios from one run of this script, not figures from different runs.

`--beside ARGS` also times a second command, cold and warm, in each repeat right after the first, and prints
its medians over the first command's (e.g. the image-model command beside the language-model one:
`--beside "--model flux.2-klein-4b --vram 12 --serve comfyui"`; goal: at most 1.0, within the same time).

The `peftpick` script leaves with os._exit once its exit handlers have run (peftpick/cli.py), skipping the
interpreter's teardown of the imported modules; the floor, a plain `python -c`, pays its own. So the script also
times the floor leaving the same way and prints cold / that floor beside the goal ratio, for a like-for-like view.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = "import torch, transformers, peft, sklearn, pandas, rich"
FLOOR_WITHOUT_TEARDOWN = FLOOR + ", os, sys; sys.stdout.flush(); os._exit(0)"
DEFAULT_ARGS = ["--model", "llama-3.2-3b", "--vram", "16", "--serve", "vllm"]
GOALS = {"cold": 1.3, "warm": 0.5}


def timed(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_args = DEFAULT_ARGS
    if "--" in argv:
        command_args, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--beside", help="a second command's peftpick arguments, timed in each repeat too")
    args = parser.parse_args(argv)
    beside_args = args.beside.split() if args.beside else None

    peftpick = [sys.executable, "-m", "peftpick.cli", *command_args]
    times: dict[str, list[float]] = {"floor": [], "floor_without_teardown": [], "cold": [], "warm": []}
    if beside_args:
        times.update(beside_cold=[], beside_warm=[])
    torch_in_warm, torch_in_beside_warm = [], []
    for repeat in range(1, args.repeats + 1):
        with tempfile.TemporaryDirectory(prefix="peftpick-speed-") as folder:
            env = dict(os.environ, PEFTPICK_CACHE_DIR=folder)
            times["floor"].append(timed([sys.executable, "-c", FLOOR], env)[0])
            times["floor_without_teardown"].append(timed([sys.executable, "-c", FLOOR_WITHOUT_TEARDOWN], env)[0])
            times["cold"].append(timed(peftpick, env)[0])
            seconds, done = timed([sys.executable, "-X", "importtime", "-m", "peftpick.cli", *command_args], env)
            times["warm"].append(seconds)  # importtime's own cost is a few per cent; it only makes warm slower
            torch_in_warm.append(any(line.rstrip().endswith("| torch") for line in done.stderr.splitlines()))
        print(f"repeat {repeat}: floor {times['floor'][-1]:.1f} s ({times['floor_without_teardown'][-1]:.1f} s "
              f"without teardown), cold {times['cold'][-1]:.1f} s, warm "
              f"{times['warm'][-1]:.1f} s{' (imported torch!)' if torch_in_warm[-1] else ''}", flush=True)
        if beside_args:
            with tempfile.TemporaryDirectory(prefix="peftpick-speed-") as folder:
                env = dict(os.environ, PEFTPICK_CACHE_DIR=folder)
                beside = [sys.executable, "-m", "peftpick.cli", *beside_args]
                times["beside_cold"].append(timed(beside, env)[0])
                seconds, done = timed([sys.executable, "-X", "importtime", *beside[1:]], env)  # as the first's
                times["beside_warm"].append(seconds)
                torch_in_beside_warm.append(any(line.rstrip().endswith("| torch") for line in done.stderr.splitlines()))
            print(f"repeat {repeat}: beside: cold {times['beside_cold'][-1]:.1f} s, warm "
                  f"{times['beside_warm'][-1]:.1f} s{' (imported torch!)' if torch_in_beside_warm[-1] else ''}",
                  flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: medians[name] / medians["floor"] for name in ("cold", "warm")}
    like_for_like = {name: medians[name] / medians["floor_without_teardown"] for name in ("cold", "warm")}
    print(f"\ncommand: peftpick {' '.join(command_args)}")
    print(f"median of {args.repeats}: floor {medians['floor']:.1f} s ({medians['floor_without_teardown']:.1f} s "
          f"without teardown), cold {medians['cold']:.1f} s, "
          f"warm {medians['warm']:.1f} s")
    for name, ratio in ratios.items():
        verdict = "met" if ratio <= GOALS[name] else "NOT met"
        print(f"{name} / floor = {ratio:.2f} (goal <= {GOALS[name]}: {verdict}); / floor without teardown = "
              f"{like_for_like[name]:.2f}")
    print(f"warm runs that imported torch: {sum(torch_in_warm)} of {args.repeats}")
    beside_ratios = {}
    if beside_args:
        beside_ratios = {name: medians[f"beside_{name}"] / medians[name] for name in ("cold", "warm")}
        print(f"beside: peftpick {' '.join(beside_args)}: cold {medians['beside_cold']:.1f} s "
              f"({beside_ratios['cold']:.2f}x the first command's), warm {medians['beside_warm']:.1f} s "
              f"({beside_ratios['warm']:.2f}x); its warm runs that imported torch: {sum(torch_in_beside_warm)}")
    if args.json:
        import peftpick as package

        args.json.write_text(json.dumps({
            "command": ["peftpick", *command_args], "repeats": args.repeats, "seconds": times,
            "medians_s": medians, "ratios": ratios, "ratios_to_floor_without_teardown": like_for_like,
            "goals": GOALS, "warm_imported_torch": torch_in_warm,
            **({"beside_command": ["peftpick", *beside_args], "beside_ratios": beside_ratios,
                "beside_warm_imported_torch": torch_in_beside_warm} if beside_args else {}),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "peftpick": package.__version__,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
