"""`tunesmith dashboard`: a local web page of runs, their curves and evaluations.

    tunesmith dashboard runs/ [--allow-train] [--bench benchmarks/methods/results.json]

`runs.py` reads run folders as `tunesmith train` leaves them (nothing extra is written during
training), `app.py` serves them as JSON beside the page, and `static/` holds the page itself:
hand-written HTML, CSS and JavaScript with its own SVG line chart, shipped in the package, so the
dashboard works with no internet. `launch.py` starts trainings from the page's recipe form.
"""
from __future__ import annotations

from .app import DashboardError, build_app, dashboard
from .launch import Launcher, LaunchError
from .runs import RunsFolder, UnknownRun, load_bench

__all__ = ["DashboardError", "LaunchError", "Launcher", "RunsFolder", "UnknownRun", "build_app", "dashboard",
           "load_bench"]
