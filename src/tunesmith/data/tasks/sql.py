"""The `sql` task: questions about a generated company database, answered with one SQLite query and
scored by execution accuracy (the query's result equals the gold query's result).

    task = SqlTask(seed=0)
    ex = task.examples("test")[0]
    task.score("SELECT name FROM employees WHERE city = 'Oslo'", ex)   # Verdict(correct=..., ...)

This module runs, compares and scores queries, and holds the task; the database, its schema and the
27 question families are in `sql_data` (re-exported here).
"""
from __future__ import annotations

import math
import re
import sqlite3
import time
from pathlib import Path

from .base import SPLITS, Example, Verdict
from ._common import GeneratedTask, generate_splits
from .sql_data import (DEPARTMENTS, FAMILIES, HIRE_YEARS, N_EMPLOYEES, PROJECTS, SCHEMA, SLOT_VALUES, START_YEARS,
                       TABLES, VERSION, Family, build_database, schema_hash, value_split)

__all__ = ["DEPARTMENTS", "FAMILIES", "HIRE_YEARS", "N_EMPLOYEES", "PROJECTS", "SCHEMA", "SLOT_VALUES", "START_YEARS",
           "TABLES", "VERSION", "Family", "SqlError", "SqlTask", "build_database", "compare_results", "execute",
           "extract_sql", "schema_hash", "score_sql", "sql_answer_end"]


# ----------------------------------------------------------------------------- running and comparing

class SqlError(Exception):
    """A query that could not run: bad SQL, a write, a timeout, too many rows."""


_READ_ONLY = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


def _authorize(action, *args):
    # Belt and braces on top of mode=ro: also refuses ATTACH (which could create files) and PRAGMA.
    return sqlite3.SQLITE_OK if action in _READ_ONLY else sqlite3.SQLITE_DENY


def execute(db: str | Path, sql: str, timeout_s: float = 2.0, max_rows: int = 10000) -> list[tuple]:
    """Run one read-only query on the sqlite file `db` and return its rows.

    Raises:
        SqlError: the query failed, tried to write, ran past `timeout_s` or returned more than `max_rows` rows.
    """
    if not Path(db).is_file():
        raise SqlError(f"database not found: {db}")
    con = sqlite3.connect(Path(db).resolve().as_uri() + "?mode=ro", uri=True, timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    con.set_progress_handler(lambda: time.monotonic() > deadline, 10000)  # non-zero return aborts the query
    con.set_authorizer(_authorize)
    try:
        rows = con.execute(sql).fetchmany(max_rows + 1)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as e:
        if time.monotonic() > deadline:
            raise SqlError(f"timed out after {timeout_s:g} s") from None
        raise SqlError(str(e)) from None
    finally:
        con.close()
    if len(rows) > max_rows:
        raise SqlError(f"more than {max_rows} rows")
    return rows


def _cell_key(v) -> tuple:
    # Sort key per type; numbers rounded to 6 significant digits so near-equal floats sort together.
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, (int, float)):
        return (1, float(f"{float(v):.6g}"), "")
    if isinstance(v, str):
        return (2, 0.0, v)
    return (3, 0.0, bytes(v).hex())


def _same_cell(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a_num, b_num = isinstance(a, (int, float)), isinstance(b, (int, float))
    if a_num or b_num:
        if not (a_num and b_num):
            return False  # '1' is not 1: a number stored as text is a different answer
        if isinstance(a, int) and isinstance(b, int):
            return a == b
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)  # float noise only: rounding is an error
    return type(a) is type(b) and a == b


def compare_results(pred_rows, gold_rows, ordered: bool) -> bool:
    """Whether two query results are the same answer: as lists when `ordered`, else as multisets
    (duplicates count). Column names are ignored; column counts must match; 1 == 1.0, '1' != 1,
    NULL == NULL, floats equal within a relative 1e-9 (summation-order noise)."""
    if len(pred_rows) != len(gold_rows):
        return False
    if not ordered:
        key = lambda row: tuple(_cell_key(v) for v in row)  # noqa: E731
        pred_rows, gold_rows = sorted(pred_rows, key=key), sorted(gold_rows, key=key)
    return all(len(p) == len(g) and all(map(_same_cell, p, g)) for p, g in zip(pred_rows, gold_rows))


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_sql(text: str) -> str:
    """The query in a model's answer: the first ```sql block, else the first ``` block, else the text
    up to the first blank line; in each case only up to the first `;` outside quotes."""
    blocks = _FENCE.findall(text)
    sql_blocks = [body for lang, body in blocks if lang.lower() in ("sql", "sqlite")]
    if sql_blocks or blocks:
        body = (sql_blocks or [b for _, b in blocks])[0]
    else:
        body = re.split(r"\n[ \t]*\n", text.strip(), maxsplit=1)[0]
    quote = None
    for i, ch in enumerate(body):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"`":
            quote = ch
        elif ch == ";":
            return body[:i].strip()
    return body.strip()


def sql_answer_end(text: str) -> int | None:
    """The `sql` task's stop rule: the end of the first ```sql (or ```sqlite) block, once that block is
    closed. `extract_sql` then scores that block whatever follows (later blocks never come first, and
    every ``` before it is already paired), so nothing after it can change the verdict. An answer
    without a closed SQL block could still be overridden by a block written later: no stop (None)."""
    for m in _FENCE.finditer(text):
        if m.group(1).lower() in ("sql", "sqlite"):
            return m.end() if m.end() > m.end(2) else None  # closed by ``` rather than by the end
    return None


def score_sql(prediction: str, reference: str, db: str | Path, ordered: bool | None = None,
              timeout_s: float = 2.0, gold_rows: list | None = None) -> Verdict:
    """Execution accuracy of one answer: run both queries on `db` and compare their results.
    `ordered=None` means: ordered iff the gold query has an ORDER BY."""
    sql = extract_sql(prediction)
    if not sql:
        return Verdict(False, 0.0, "no SQL found in the answer", sql)
    if gold_rows is None:
        gold_rows = execute(db, reference, timeout_s=max(timeout_s, 10.0))
    if ordered is None:
        ordered = "ORDER BY" in reference.upper()
    try:
        rows = execute(db, sql, timeout_s=timeout_s)
    except SqlError as e:
        return Verdict(False, 0.0, f"sql error: {e}", sql)
    ok = compare_results(rows, gold_rows, ordered)
    return Verdict(ok, float(ok), None if ok else "wrong result", sql)


# ----------------------------------------------------------------------------- the task

def _informative(rows: list[tuple]) -> bool:
    """A gold result worth asking for: not empty, and not a lone 0 or NULL (a count of nothing)."""
    return bool(rows) and not (len(rows) == 1 and all(v in (None, 0) for v in rows[0]))


class SqlTask(GeneratedTask):
    """Questions about a generated company database; see the module docstring."""
    name = "sql"
    metric = "execution_accuracy"
    system_prompt = "Answer with one SQLite query."
    answer_end = staticmethod(sql_answer_end)

    def __init__(self, seed: int = 0, n_train: int = 800, n_validation: int = 100, n_test: int = 200,
                 workdir: str | Path | None = None):
        super().__init__(seed, n_train, n_validation, n_test)
        self.timeout_s = 2.0
        self.db = build_database(seed, workdir)
        self._gold: dict[str, list] = {}

    def score(self, prediction: str, example: Example) -> Verdict:
        db = example.meta["db"]
        key = f"{db}\n{example.reference}"
        if key not in self._gold:
            self._gold[key] = execute(db, example.reference, timeout_s=10.0)
        return score_sql(prediction, example.reference, db, ordered=example.meta.get("ordered"),
                         timeout_s=self.timeout_s, gold_rows=self._gold[key])

    def _generate(self) -> dict[str, list[Example]]:
        values = value_split(self.seed)
        con = sqlite3.connect(Path(self.db).resolve().as_uri() + "?mode=ro", uri=True)
        try:
            names = [n for (n,) in con.execute("SELECT name FROM employees ORDER BY id")]
        finally:
            con.close()
        pools = {kind: p for kind, p in values.pools.items() if kind not in ("first", "last")}
        pools["name"] = {s: [n for n in names if values.split_of[n.split()[0]] == s] for s in SPLITS}
        def draw_for(split, rng):
            def draw(t):
                template_id, family, i = t
                slot = {s: rng.choice(pools[s][split]) for s in family.slots}
                sql = family.sql.format(**slot)
                question = family.phrasings[i].format(**slot)
                question = question[0].upper() + question[1:]
                rows = execute(self.db, sql, timeout_s=10.0)
                if not _informative(rows):
                    return None
                self._gold[f"{self.db}\n{sql}"] = rows
                meta = {"db": str(self.db), "template": template_id, "family": family.name,
                        "values": list(slot.values()), "ordered": family.ordered}
                return question, (f"{SCHEMA}\nQuestion: {question}", sql, meta)
            return draw

        return generate_splits("sql", self.seed, FAMILIES, self.sizes, draw_for)
