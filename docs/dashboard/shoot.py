"""Screenshots of `tunesmith dashboard` over real runs, for the documentation (the PNGs beside this file).

    python docs/dashboard/shoot.py RUNS --compare A,B --evals A [--out docs/dashboard]

Starts `tunesmith dashboard RUNS --allow-train` as a user would, launches one more training through
the page's recipe form (the live run: it is stopped with SIGTERM once the shots are taken, so it
ends as an interrupted run with a checkpoint), and photographs each view in Chromium: the run
list, the live run, two runs compared, an evaluation before/after, the benchmark table, the form.
Needs playwright and Debian's Chromium (`make test` installs both).

The PNGs here: SmolLM2-135M-Instruct on 2 shared CPU cores (fp32; bf16 is slow without AVX512-BF16),
run from a project folder holding recipes/ and runs/ (so every path shown is relative):

    S="train.steps=16 train.batch_tokens=512 train.precision=fp32 model.frozen_dtype=same train.threads=1"
    tunesmith quickstart $S train.eval_every=8 train.save_every=8 eval.limit=8 eval.max_new_tokens=48 \
        output_dir=runs name=sql-lora-r16            # sql accuracy on 8 test questions: 0% -> 25%
    tunesmith train recipes/quickstart.yaml $S train.eval_every=8 train.save_every=8 eval.task=null \
        method.lora.rank=4 train.lr=3e-4 output_dir=runs name=sql-lora-r4
    python docs/dashboard/shoot.py runs --compare sql-lora-r16,sql-lora-r4 --evals sql-lora-r16 --live-points 5 \
        --live-override train.steps=24 --live-override train.batch_tokens=512 --live-override train.precision=fp32 \
        --live-override model.frozen_dtype=same --live-override train.threads=1 --live-override eval.task=null
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dashboard(runs: str, bench: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunesmith", "dashboard", runs, "--port", str(port), "--bench", bench, "--allow-train"]
    proc = subprocess.Popen(cmd)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/config", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the dashboard exited ({proc.returncode})")
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the dashboard did not answer within 60 s")


def launch_live(page, base: str, out: Path, args) -> int:
    """Fill the recipe form, start the training, wait until its curve has `--live-points` points."""
    page.goto(f"{base}/#/train")
    page.fill("#recipe", args.live_recipe)
    page.fill("#name", args.live_name)
    page.fill("#overrides", "\n".join(args.live_override))
    page.screenshot(path=str(out / "train-form.png"), full_page=True)
    with page.expect_response("**/api/train") as answer:
        page.click("#train-form button[type=submit]")
    started = answer.value.json()
    if "pid" not in started:
        raise SystemExit(f"the form did not start a training: {started}")
    page.wait_for_function(f"""() => {{ const p = document.querySelector('[data-chart="loss"] path[data-series="train loss"]');
                                    return p && +p.dataset.points >= {args.live_points}; }}""", timeout=args.live_timeout * 1000)
    time.sleep(2)
    page.screenshot(path=str(out / "run-live.png"), full_page=True)
    return started["pid"]


def shoot(page, base: str, out: Path, args) -> None:
    page.goto(f"{base}/#/")
    page.wait_for_selector("#runs tr[data-run]")
    time.sleep(1)
    page.screenshot(path=str(out / "runs.png"), full_page=True)
    page.goto(f"{base}/#/compare/{args.compare}")
    page.wait_for_selector("#compare-chart path.series")
    time.sleep(2)
    page.screenshot(path=str(out / "compare.png"), full_page=True)
    page.goto(f"{base}/#/run/{args.evals}")
    page.wait_for_selector("#eval-table tbody tr")
    time.sleep(1)
    page.screenshot(path=str(out / "run-evals.png"), full_page=True)
    page.goto(f"{base}/#/bench")
    page.wait_for_selector("#bench tbody tr")
    page.click('#bench th[data-column="sql"]')
    page.screenshot(path=str(out / "bench.png"), full_page=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs")
    ap.add_argument("--compare", required=True, help="two or more run ids, comma-separated")
    ap.add_argument("--evals", required=True, help="a run with eval-base.json and eval-tuned.json")
    ap.add_argument("--out", default="docs/dashboard")
    ap.add_argument("--bench", default="benchmarks/methods/results.json")
    ap.add_argument("--live-recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--live-name", default="sql-live")
    ap.add_argument("--live-override", action="append", default=[], help="key=value (repeatable)")
    ap.add_argument("--live-points", type=int, default=6, help="train-loss points to wait for before the live shot")
    ap.add_argument("--live-timeout", type=int, default=900)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    dashboard = start_dashboard(args.runs, args.bench, port)
    pid = None
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            pid = launch_live(page, base, out, args)
            shoot(page, base, out, args)
            browser.close()
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)  # the training saves a checkpoint and stops
        dashboard.terminate()
        dashboard.wait(30)
    print("\n".join(str(p) for p in sorted(out.glob("*.png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
