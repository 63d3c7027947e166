"""The dashboard in a real browser (Playwright driving Debian's Chromium): the run list shows the
runs, a training run's curve grows while its metrics.jsonl grows, the compare view draws both runs,
the evaluation view shows each example's answer before and after tuning, the benchmark table sorts.

The runs are real tiny trainings (one evaluated before and after, quickstart-style); the live one
is a thread appending metric rows at a training's pace, so the test controls when the curve moves.
Screenshots go to $TUNESMITH_SHOTS when it is set (e.g. TUNESMITH_SHOTS=docs/dashboard), else to
the test's temporary folder: the test never writes into the repository on its own.

`make test` installs what this needs: playwright (the test extra) and Chromium (apt). Without them
the test fails, saying so, rather than skipping: a skip would hide that the page went untested."""
import json
import math
import os
import shutil
import threading
from pathlib import Path

import pytest

from conftest import tiny_recipe
from test_dashboard import serving, write_rows
from tunesmith.dashboard import Launcher, RunsFolder, build_app
from tunesmith.eval.files import FileTask
from tunesmith.eval.runner import evaluate, save_result
from tunesmith.models.load import load_model
from tunesmith.train.loop import train
from tunesmith.train.metrics import read_metrics

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "methods" / "results.json"
QUESTIONS = [{"prompt": f"What is {i} plus {i + 1}?", "reference": str(2 * i + 1)} for i in (2, 5, 7, 11)]


def browser_tools():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `make test` installs it (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install -y chromium)")
    return sync_playwright, chromium


@pytest.fixture(scope="module")
def runs_root(tiny_model_dir, tmp_path_factory):
    """`lora-a` (evaluated before and after training), `lora-b` (another learning rate), both real."""
    tmp = tmp_path_factory.mktemp("dash-browser")
    root = tmp / "runs"
    questions = tmp / "plus.jsonl"
    write_rows(questions, QUESTIONS)
    task = FileTask(questions, "contains")
    model, tok = load_model(str(tiny_model_dir))
    before = evaluate(model, tok, task, max_new_tokens=8, progress=False)
    run = train(tiny_recipe(tmp, tiny_model_dir, f"output_dir={root}", "name=lora-a"), model=model, tokenizer=tok)
    after = evaluate(model, tok, task, max_new_tokens=8, progress=False)
    save_result(before, root / "lora-a" / "eval-base.json")
    save_result(after, root / "lora-a" / "eval-tuned.json")
    assert run.status == "completed"
    assert train(tiny_recipe(tmp, tiny_model_dir, f"output_dir={root}", "name=lora-b", "train.lr=3e-3")).status == "completed"
    return root


class LiveRun:
    """A run folder, created by `start()`, whose metrics.jsonl then gains a training row every
    `every` seconds until `close()`."""

    def __init__(self, root: Path, every: float = 0.25, steps: int = 2000):
        self.folder = root / "live"
        self.every, self.steps, self.stop = every, steps, threading.Event()
        self.thread = threading.Thread(target=self._grow, daemon=True)

    @staticmethod
    def row(step: int) -> dict:
        return {"step": step, "loss": 2.0 + 3.0 * math.exp(-step / 15), "lr": 1e-3, "grad_norm": 1.0 + 1.0 / step}

    def start(self):
        self.folder.mkdir()
        (self.folder / "recipe.yaml").write_text(f"name: live\nmethod: {{name: lora}}\ntrain: {{steps: {self.steps}}}\n")
        write_rows(self.folder / "metrics.jsonl", [self.row(s) for s in (1, 2, 3)])
        self.thread.start()

    def _grow(self):
        step = 4
        while not self.stop.wait(self.every) and step <= self.steps:
            write_rows(self.folder / "metrics.jsonl", [self.row(step)], "a")
            step += 1

    def close(self):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(5)


class Shots:
    """Screenshots of the page, and of single elements, as PNG bytes (saved where they belong)."""

    def __init__(self, page, folder: Path):
        self.page, self.folder = page, folder
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, selector: str | None = None) -> bytes:
        path = self.folder / f"{name}.png"
        target = self.page.locator(selector).first if selector else self.page
        data = target.screenshot(path=str(path), **({} if selector else {"full_page": True}))
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, f"{name}: not a real screenshot"
        return data


def points(page, chart: str, series: str) -> int:
    return int(page.get_attribute(f'[data-chart="{chart}"] path[data-series="{series}"]', "data-points"))


def check_run_list(page, shot, live: LiveRun):
    page.goto(page.base + "/#/")
    page.wait_for_selector('#runs tr[data-run="lora-b"]')
    assert page.locator("#runs tr[data-run]").count() == 2
    live.start()  # a training starts: its row appears without reloading the page
    page.wait_for_selector('#runs tr[data-run="live"]')
    listed = page.eval_on_selector_all("#runs tr[data-run]", "rows => rows.map(r => [r.dataset.run, r.dataset.status])")
    assert listed == [["live", "running"], ["lora-a", "finished"], ["lora-b", "finished"]]
    assert page.inner_text('#runs tr[data-run="lora-a"] td:nth-child(4)') == "lora"
    assert "base accuracy" in page.inner_text('#runs tr[data-run="lora-a"]')
    shot("runs")


def check_live_curve(page, shot, live: LiveRun):
    page.goto(page.base + "/#/run/live")
    page.wait_for_selector('[data-chart="loss"] path[data-series="train loss"]')
    first, first_png = points(page, "loss", "train loss"), shot("live-1", '[data-chart="loss"]')
    page.wait_for_function(f"""() => +document.querySelector('[data-chart="loss"] path[data-series="train loss"]')
                                 .dataset.points >= {first + 4}""", timeout=20000)
    later, later_png = points(page, "loss", "train loss"), shot("live-2", '[data-chart="loss"]')
    on_disk = len([r for r in read_metrics(live.folder / "metrics.jsonl") if "loss" in r])
    assert first < later <= on_disk, (first, later, on_disk)
    assert first_png != later_png  # the picture itself changed, not only an attribute
    assert page.inner_text("#status") == "running"
    shot("run-live")


def check_compare(page, shot, root: Path):
    page.goto(page.base + "/#/")
    page.wait_for_selector('#runs tr[data-run="lora-b"]')
    page.check('#runs tr[data-run="lora-a"] input[type=checkbox]')
    page.check('#runs tr[data-run="lora-b"] input[type=checkbox]')
    page.click("text=Compare selected")
    page.wait_for_function("() => document.querySelectorAll('#compare-chart path.series[data-points=\"6\"]').length === 2")
    drawn = page.eval_on_selector_all("#compare-chart path.series", "ps => ps.map(p => [p.dataset.series, +p.dataset.points])")
    want = [[n, len([r for r in read_metrics(root / n / "metrics.jsonl") if "loss" in r])] for n in ("lora-a", "lora-b")]
    assert drawn == want
    page.select_option("#metric", "lr")
    page.wait_for_selector('[data-chart="lr by step"]')
    page.select_option("#metric", "loss")
    shot("compare")


def check_evals(page, shot, root: Path):
    page.goto(page.base + "/#/run/lora-a")
    page.wait_for_selector("#eval-table tbody tr")
    heads = page.eval_on_selector_all("#eval-table th", "hs => hs.map(h => h.textContent)")
    assert heads == ["#", "prompt", "reference", "base answer", "tuned answer"]
    files = {k: json.loads((root / "lora-a" / f"eval-{k}.json").read_text())["records"] for k in ("base", "tuned")}
    for i, q in enumerate(QUESTIONS):
        row = f"#eval-table tbody tr:nth-child({i + 1})"
        assert page.inner_text(f"{row} td:nth-child(2)") == q["prompt"]
        for label in ("base", "tuned"):
            cell = f'{row} td[data-label="{label}"]'
            assert page.text_content(f"{cell} .answer") == files[label][i]["prediction"]
            assert page.get_attribute(cell, "class") == ("right" if files[label][i]["correct"] else "wrong")
    shot("evals")


def check_bench(page, shot):
    rows = json.loads(BENCH.read_text())
    page.goto(page.base + "/#/bench")
    page.wait_for_selector("#bench tbody tr")
    page.click('#bench th[data-column="sql"]')  # first click: highest first
    best = max(rows, key=lambda r: r["sql"])["method"]
    assert page.inner_text("#bench tbody tr:first-child td:first-child") == best
    page.click('#bench th[data-column="sql"]')
    assert page.inner_text("#bench tbody tr:first-child td:first-child") == min(rows, key=lambda r: r["sql"])["method"]
    assert page.locator("#bench tbody tr").count() == len(rows)
    shot("bench")


def test_dashboard_in_chromium(runs_root, tmp_path):
    sync_playwright, chromium = browser_tools()
    shots_dir = Path(os.environ.get("TUNESMITH_SHOTS") or tmp_path / "shots")
    errors = []
    live = LiveRun(runs_root)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.set_default_timeout(20000)
            launcher = Launcher(runs_root, cwd=tmp_path)
            with serving(build_app(RunsFolder(runs_root, live_window=30), bench=BENCH, launcher=launcher)) as url:
                page.base = url
                shot = Shots(page, shots_dir)
                check_run_list(page, shot, live)
                check_live_curve(page, shot, live)
                check_compare(page, shot, runs_root)
                check_evals(page, shot, runs_root)
                check_bench(page, shot)
                page.goto(url + "/#/train")
                page.wait_for_selector("#train-form")
                shot("train-form")
                page.goto("about:blank")  # no poll may hit this server once it stops
            with serving(build_app(RunsFolder(runs_root))) as url:  # no --allow-train: no form, no bench
                page.goto(url + "/#/")
                page.wait_for_selector("#runs tr[data-run]")
                assert page.is_hidden("#nav-train") and page.is_hidden("#nav-bench")
        finally:
            live.close()
            browser.close()
    assert errors == []
