"""Screenshot the HTML report as a person sees it: headless Chromium renders the page, the PNG goes to results/.

    python benchmarks/screenshot_report.py                     # both cases below
    python benchmarks/screenshot_report.py --case llama-3.2-3b  # one

Each case runs a recommendation through the Python API (probes off, so the figures are the estimator's and the
same on every machine), writes the report with `rec.report("html")`, loads it in Chromium
(`apt-get install -y chromium`) and saves the top of the page -- verdict, the two pictures and the start of the
ranked table -- as `results/report-<model>.png`. About 30 s per case on 2 cores, most of it the recommendation.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {
    "llama-3.2-3b": {"model": "llama-3.2-3b", "vram_gb": 16, "serve": "vllm"},
    "flux.2-klein-4b": {"model": "flux.2-klein-4b", "vram_gb": 12, "serve": "comfyui"},
}
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--force-device-scale-factor=1",
)
LIMIT_BYTES = 400 * 1024  # PNGs kept in the repository stay under this


def chromium_binary(given: str | None) -> str:
    for candidate in (given, "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("no Chromium found: apt-get install -y chromium (or pass --chromium PATH)")


def screenshot(chromium: str, page: Path, png: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory(prefix="peftpick-chromium-") as profile:
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                   f"--window-size={width},{height}", page.as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not png.exists():
        raise SystemExit(f"Chromium failed ({done.returncode}): {done.stderr[-2000:]}")


def shrink(png: Path) -> str:
    """Re-encode with a 256-colour palette when the PNG is over the limit (Pillow, if installed)."""
    size = png.stat().st_size
    if size <= LIMIT_BYTES:
        return f"{size / 1024:.0f} KiB"
    try:
        from PIL import Image
    except ImportError:
        return f"{size / 1024:.0f} KiB (over {LIMIT_BYTES // 1024} KiB; install Pillow to shrink it)"
    with Image.open(png) as image:
        image.convert("RGB").quantize(colors=256).save(png, optimize=True)
    return f"{size / 1024:.0f} KiB -> {png.stat().st_size / 1024:.0f} KiB (256 colours)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: every case")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--chromium", help="the Chromium binary (default /usr/bin/chromium)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1800, help="pixels of the page's top that are saved")
    parser.add_argument("--keep-html", action="store_true", help="also save the HTML page beside the PNG")
    args = parser.parse_args(argv)

    chromium = chromium_binary(args.chromium)
    import peftpick

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.case or list(CASES):
        started = time.perf_counter()
        rec = peftpick.recommend(**CASES[name], probe=False)
        page = rec.report("html")
        png = args.out_dir / f"report-{name}.png"
        with tempfile.TemporaryDirectory(prefix="peftpick-report-") as folder:
            html_path = Path(folder) / f"report-{name}.html"
            html_path.write_text(page, encoding="utf-8")
            screenshot(chromium, html_path, png, args.width, args.height)
            if args.keep_html:
                shutil.copy(html_path, args.out_dir / html_path.name)
        print(f"{name}: {len(rec.ranked)} ranked, {len(rec.excluded)} excluded -> {png} ({shrink(png)}), "
              f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
