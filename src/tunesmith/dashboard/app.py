"""The dashboard's HTTP side: a FastAPI app with a few JSON routes and the page's own three files.

    GET  /                              the page (static/index.html; app.js and style.css beside it)
    GET  /api/config                    what the page may show: the train form, the benchmark table
    GET  /api/runs                      every run: status, method, data, steps, best metrics
    GET  /api/runs/<id>/metrics?since=N metric rows from row N on (the page polls this while a run trains)
    GET  /api/runs/<id>/evals           evaluations and their answers per example, side by side
    GET  /api/runs/<id>/recipe          the resolved recipe (text)
    GET  /api/runs/<id>/log             the end of train.log (trainings launched from the page)
    GET  /api/bench                     the methods benchmark table
    POST /api/train                     start `tunesmith train` (403 unless --allow-train)

Only these routes answer: the page's files are a fixed list (no static folder is mounted), and a
run id must be one of the listing's (runs.py), so nothing outside the runs folder is ever served.
The page polls rather than holding a socket open: nothing to reconnect when a laptop sleeps.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .launch import Launcher, LaunchError
from .runs import RunsFolder, UnknownRun, load_bench

try:  # the `serve` extra, shared with `tunesmith serve`
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
except ImportError:  # build_app says what to install
    FastAPI = None

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
              "style.css": "text/css; charset=utf-8"}
MAX_FORM_BYTES = 64 << 10
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class DashboardError(ValueError):
    """A dashboard that cannot start as asked; the message says what to change."""


def build_app(runs: RunsFolder, *, bench: Path | None = None, launcher: Launcher | None = None):
    """The app over a runs folder; `bench` is a benchmark results.json to show; `launcher` enables
    the train form (None: the form is hidden and POST /api/train answers 403)."""
    if FastAPI is None:
        raise DashboardError("tunesmith dashboard needs fastapi and uvicorn: pip install 'tunesmith[serve]'")
    app = FastAPI(title="tunesmith dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/")
    def page():
        return _page_file("index.html")

    @app.get("/static/{name}")
    def static(name: str):
        if name not in PAGE_FILES:
            return _error(404, f"no file {name}")
        return _page_file(name)

    @app.get("/api/config")
    def config():
        return {"runs": runs.root.name, "allow_train": launcher is not None,
                "bench": bench is not None, "live_window_s": runs.live_window}

    @app.get("/api/runs")
    def list_runs():
        return {"runs": runs.list()}

    @app.get("/api/runs/{run_id:path}/metrics")
    def metrics(run_id: str, since: int = 0):
        return _on_run(lambda: runs.metrics(run_id, since))

    @app.get("/api/runs/{run_id:path}/evals")
    def evals(run_id: str):
        return _on_run(lambda: runs.evals(run_id))

    @app.get("/api/runs/{run_id:path}/recipe")
    def recipe(run_id: str):
        return _on_run(lambda: PlainTextResponse(runs.recipe_text(run_id)))

    @app.get("/api/runs/{run_id:path}/log")
    def log(run_id: str):
        return _on_run(lambda: PlainTextResponse(runs.log_tail(run_id)))

    @app.get("/api/bench")
    def bench_table():
        if bench is None:
            return _error(404, "no benchmark results (start the dashboard with --bench FILE)")
        try:
            return load_bench(bench)
        except ValueError as e:
            return _error(422, str(e))

    @app.post("/api/train")
    async def start_training(request: Request):
        if launcher is None:
            return _error(403, "launching trainings is off: start the dashboard with --allow-train")
        return _launch(launcher, await request.body())

    return app


def _error(status: int, message: str):
    return JSONResponse({"error": message}, status_code=status)


def _on_run(answer):
    """The answer about one run, or 404 when the id is not in the listing."""
    try:
        return answer()
    except UnknownRun as e:
        return _error(404, str(e))


def _launch(launcher: Launcher, body: bytes):
    if len(body) > MAX_FORM_BYTES:
        return _error(413, f"the form is over {MAX_FORM_BYTES} bytes")
    try:
        return launcher.start(json.loads(body or b"null"))
    except ValueError as e:  # LaunchError, or a body that is not JSON
        return _error(400, str(e) if isinstance(e, LaunchError) else f"the form is not valid JSON ({e})")


def _page_file(name: str):
    return Response((STATIC / name).read_bytes(), media_type=PAGE_FILES[name],
                    headers={"Cache-Control": "no-cache"})


def dashboard(root: str | Path, *, host: str = "127.0.0.1", port: int = 8765, bench: str | Path | None = None,
              allow_train: bool = False, live_window: float | None = None) -> None:
    """Serve the dashboard until Ctrl-C. Another host than this machine's is allowed with a warning
    (the page shows run data to whoever reaches the port), but never with the train form: a form that
    starts processes is for the person at this machine."""
    local = host in LOCAL_HOSTS
    if allow_train and not local:
        raise DashboardError(f"--allow-train serves only this machine: drop --host {host} (or the form)")
    if not local:
        print(f"[tunesmith] warning: --host {host} shows your runs to anyone who can reach port {port}",
              file=sys.stderr, flush=True)
    launcher = Launcher(Path(root)) if allow_train else None
    kwargs = {"live_window": live_window} if live_window is not None else {}
    try:
        runs = RunsFolder(root, alive=launcher.alive if launcher else None, **kwargs)
    except FileNotFoundError as e:
        raise DashboardError(str(e)) from None
    if bench is not None and not Path(bench).is_file():
        raise DashboardError(f"--bench {bench}: no such file")
    app = build_app(runs, bench=Path(bench) if bench else None, launcher=launcher)
    import uvicorn  # installed with fastapi (the `serve` extra), checked by build_app

    print(f"[tunesmith] dashboard of {runs.root} at http://{host}:{port}/ "
          f"(train form {'on' if launcher else 'off'}); Ctrl-C stops", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
