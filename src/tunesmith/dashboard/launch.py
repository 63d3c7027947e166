"""Starting `tunesmith train` from the dashboard's recipe form (only with `--allow-train`).

The form sends a recipe file, a run name and `key=value` overrides; the training runs as its own
process, `python -m tunesmith train RECIPE ... output_dir=<runs folder> name=<name>`, so the run
lands in the runs folder and shows up in the listing like any other. It runs in the dashboard's
working directory — where a user would have typed the same command — so relative paths in the
recipe (data files, recipes/...) mean what they mean on the command line. Its output goes to
`<run>/train.log`, which the run view shows: a run that fails at once still says why. The
training is not tied to the page: it keeps going when the dashboard stops (stop it as any
training: SIGTERM to its pid, which the form answers with; it saves a checkpoint first).
"""
from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
RESERVED = ("output_dir", "name")  # the form sets these: the run must land in the runs folder


class LaunchError(ValueError):
    """A form that cannot start a training; the message names the field."""


class Launcher:
    """Starts trainings and remembers their processes, so the listing can tell a live one."""

    def __init__(self, root: Path, cwd: Path | None = None):
        self.root = Path(root).resolve()
        self.cwd = Path(cwd or Path.cwd()).resolve()
        self._procs: dict[Path, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def alive(self, folder: Path) -> bool | None:
        """True while the training started for `folder` runs, False once it ended, None if none was started."""
        proc = self._procs.get(Path(folder).resolve())
        return None if proc is None else proc.poll() is None

    def command(self, form: dict) -> tuple[list[str], Path]:
        """The command line and the run folder for a form; every field is checked first."""
        if not isinstance(form, dict):
            raise LaunchError("the form must be a JSON object with recipe, name and overrides")
        recipe = form.get("recipe")
        name = form.get("name")
        overrides = form.get("overrides") or []
        if isinstance(overrides, str):
            overrides = [line.strip() for line in overrides.splitlines() if line.strip()]
        if not isinstance(recipe, str) or not recipe.strip():
            raise LaunchError("recipe: give the path of a recipe file (e.g. recipes/quickstart.yaml)")
        path = (self.cwd / recipe.strip()).resolve()
        if not path.is_file():
            raise LaunchError(f"recipe: {recipe.strip()} is not a file (paths are relative to where the dashboard runs)")
        if not isinstance(name, str) or not NAME.match(name):
            raise LaunchError("name: letters, digits, '.', '_' or '-' (up to 64), starting with a letter or digit")
        folder = self.root / name
        if folder.exists():
            raise LaunchError(f"name: a run `{name}` already exists in the runs folder; pick a new name")
        if not isinstance(overrides, list) or not all(isinstance(o, str) and OVERRIDE.match(o) for o in overrides):
            raise LaunchError("overrides: one `key=value` a line, e.g. train.steps=50")
        for o in overrides:
            if o.split("=", 1)[0] in RESERVED:
                raise LaunchError(f"overrides: {o.split('=', 1)[0]} is set by the dashboard (the run goes in the runs folder)")
        # paths as the user would type them: relative to the working directory when they lie in it,
        # so the run's resolved recipe and its log name no machine-specific folders
        cmd = [sys.executable, "-m", "tunesmith", "train", self._short(path), *overrides,
               f"output_dir={self._short(self.root)}", f"name={name}"]
        return cmd, folder

    def _short(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.cwd)) or "."
        except ValueError:
            return str(path)

    def start(self, form: dict) -> dict:
        cmd, folder = self.command(form)
        with self._lock:
            if folder.exists():
                raise LaunchError(f"name: a run `{folder.name}` already exists in the runs folder; pick a new name")
            folder.mkdir(parents=True)
            # train.log first: the folder is then listed (as running) before train writes anything
            with open(folder / "train.log", "wb") as log:
                log.write(("$ " + " ".join(cmd[1:]) + "\n").encode())
                log.flush()
                # its own session: a Ctrl-C that stops the dashboard does not stop the training
                proc = subprocess.Popen(cmd, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            self._procs[folder.resolve()] = proc
        return {"id": folder.name, "pid": proc.pid, "command": cmd[1:]}
