"""The built-in generated tasks (`sql`, `json`): determinism, split disjointness (phrasings and
values), gold answers that score correct against themselves, the SQL result comparison, the
sandboxing of model queries, and prompt lengths with the real tokenizer."""
import json
import re
import sqlite3
import time

import pytest

from tunesmith.data.tasks import BUILTIN, ExtractTask, SqlTask, get_task, task_records
from tunesmith.data.tasks.extract import FAMILIES as JSON_FAMILIES
from tunesmith.data.tasks.sql import FAMILIES as SQL_FAMILIES
from tunesmith.data.tasks.sql import SqlError, compare_results, execute, extract_sql, score_sql
from tunesmith.data.tasks.base import SPLITS

SMALL = dict(n_train=200, n_validation=40, n_test=60)


@pytest.fixture(scope="module")
def sql_task(tmp_path_factory):
    return SqlTask(seed=0, workdir=tmp_path_factory.mktemp("sql"))


@pytest.fixture(scope="module")
def json_task():
    return ExtractTask(seed=0)


def dump(db) -> dict:
    con = sqlite3.connect(db)
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}
    finally:
        con.close()


def as_tuples(examples):
    """Everything about the examples but the database path (which names the folder it lives in)."""
    return [(e.id, e.prompt, e.reference, json.dumps({k: v for k, v in e.meta.items() if k != "db"}, sort_keys=True))
            for e in examples]


def question(example) -> str:
    return example.prompt.splitlines()[-1]


def assert_disjoint_splits(task, families):
    ex = {s: task.examples(s) for s in SPLITS}
    templates = {s: {e.meta["template"] for e in ex[s]} for s in SPLITS}
    assert not templates["train"] & templates["test"]
    assert not templates["train"] & templates["validation"]
    assert not templates["validation"] & templates["test"]
    names = {f.name for f in families}
    assert {e.meta["family"] for e in ex["train"]} == names  # every family is trained
    assert {e.meta["family"] for e in ex["test"]} == names
    train_values = {v for e in ex["train"] for v in e.meta["values"]}
    train_text = "\n".join(question(e) for e in ex["train"])
    for split in ("validation", "test"):
        held = {v for e in ex[split] for v in e.meta["values"]}
        assert held and not held & train_values, split
        # Stronger: no held-out value, nor any word of one (a first name, a last name), appears as a
        # whole word anywhere in a training question.
        words = {w for v in held for w in [str(v), *str(v).split()]}
        leaked = [w for w in words if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", train_text)]
        assert not leaked, (split, leaked)


# ----------------------------------------------------------------------------- sql: data


def test_sql_is_deterministic_per_seed(sql_task, tmp_path):
    again = SqlTask(seed=0, workdir=tmp_path / "a")
    other = SqlTask(seed=1, workdir=tmp_path / "b", **SMALL)
    assert again.db != sql_task.db
    assert dump(again.db) == dump(sql_task.db)
    for split in SPLITS:
        assert as_tuples(again.examples(split)) == as_tuples(sql_task.examples(split))
    assert dump(other.db) != dump(sql_task.db)
    assert [e.prompt for e in other.examples("test")] != [e.prompt for e in sql_task.examples("test")][:60]
    # The file is reused, not rebuilt: a second task on the same folder opens the same path.
    assert SqlTask(seed=1, workdir=tmp_path / "b", **SMALL).db == other.db


def test_sql_split_sizes_and_shape(sql_task):
    sizes = {s: len(sql_task.examples(s)) for s in SPLITS}
    assert sizes == {"train": 800, "validation": 100, "test": 200}
    ex = sql_task.examples("test")[0]
    assert ex.prompt.startswith("departments(id, name)\nemployees(") and "\nQuestion: " in ex.prompt
    assert set(ex.meta) == {"db", "template", "family", "values", "ordered"}
    assert len({e.prompt for e in sql_task.examples("train")}) == 800  # no duplicate questions
    # Canonical style: one line, upper-case keywords, no trailing semicolon.
    for e in sql_task.examples("train"):
        assert "\n" not in e.reference and not e.reference.endswith(";")
        assert e.meta["ordered"] == ("ORDER BY" in e.reference)
        assert not re.search(r"\b(select|from|where|join|group by|order by)\b", e.reference)


def test_sql_splits_are_disjoint_in_templates_and_values(sql_task):
    assert_disjoint_splits(sql_task, SQL_FAMILIES)


def test_sql_gold_queries_score_correct_and_are_informative(sql_task):
    empty = 0
    for split in SPLITS:
        for ex in sql_task.examples(split):
            v = sql_task.score(ex.reference, ex)
            assert v.correct and v.score == 1.0 and v.error is None, (ex.reference, v)
            empty += not execute(ex.meta["db"], ex.reference)
    assert empty == 0


def test_sql_prompt_lengths(sql_task, tokenizer):
    def chat_tokens(ex):
        msgs = [{"role": "system", "content": sql_task.system_prompt}, {"role": "user", "content": ex.prompt},
                {"role": "assistant", "content": ex.reference}]
        return len(tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False))["input_ids"])

    test = sql_task.examples("test")
    assert max(chat_tokens(e) for e in test) <= 160
    all_refs = [e.reference for s in SPLITS for e in sql_task.examples(s)]
    assert max(len(tokenizer(r)["input_ids"]) for r in all_refs) <= 52


# ----------------------------------------------------------------------------- sql: comparing results


def test_compare_results_hand_cases():
    a, b = [(1, "x"), (2, "y")], [(2, "y"), (1, "x")]
    assert compare_results(a, b, ordered=False)
    assert not compare_results(a, b, ordered=True)  # order only matters when the gold has ORDER BY
    assert compare_results(a, list(a), ordered=True)
    # Bag semantics: duplicates count.
    assert not compare_results([(1,), (1,), (2,)], [(1,), (2,), (2,)], ordered=False)
    assert not compare_results([(1,), (2,)], [(1,), (1,), (2,)], ordered=False)
    assert compare_results([(1,), (2,), (1,)], [(1,), (1,), (2,)], ordered=False)
    # NULLs equal each other, and nothing else.
    assert compare_results([(None, 1)], [(None, 1.0)], ordered=True)
    assert not compare_results([(None,)], [(0,)], ordered=False)
    assert not compare_results([(None,)], [("",)], ordered=False)
    assert compare_results([(None,), (3,)], [(3,), (None,)], ordered=False)
    # Type affinity: 1 == 1.0, but a numeric string is not a number.
    assert compare_results([(1,)], [(1.0,)], ordered=False)
    assert not compare_results([("1",)], [(1,)], ordered=False)
    assert not compare_results([(1,)], [("1",)], ordered=True)
    # Column names are not rows; column counts must match.
    assert not compare_results([(1, 2)], [(1,)], ordered=False)
    assert not compare_results([(1,)], [(1, None)], ordered=False)
    # Floats: summation-order noise passes, a rounded value does not.
    assert compare_results([(71234.56789012,)], [(71234.56789012 * (1 + 1e-12),)], ordered=False)
    assert compare_results([(0.1 + 0.2, "a"), (5.0, "b")], [(5, "b"), (0.3, "a")], ordered=False)
    assert not compare_results([(71234.57,)], [(71234.56789012,)], ordered=False)
    assert compare_results([], [], ordered=False)
    assert not compare_results([], [(1,)], ordered=False)


# ----------------------------------------------------------------------------- sql: scoring model text


def pick(task, family, split="test"):
    return next(e for e in task.examples(split) if e.meta["family"] == family)


def test_sql_score_wrong_and_broken_queries(sql_task):
    ex = pick(sql_task, "city_employees")
    city = ex.meta["values"][0]
    wrong = ex.reference.replace(f"'{city}'", "'Nowhere'")
    v = sql_task.score(wrong, ex)
    assert not v.correct and v.score == 0.0 and v.error == "wrong result"
    v = sql_task.score("SELECT name, city FROM employees WHERE city = '%s'" % city, ex)
    assert not v.correct  # an extra column is a different answer
    v = sql_task.score("SELEC name FROM employees", ex)
    assert not v.correct and v.error.startswith("sql error:") and "syntax error" in v.error
    v = sql_task.score("SELECT name FROM staff", ex)
    assert v.error == "sql error: no such table: staff"
    assert not sql_task.score("", ex).correct


def test_sql_score_order_matters_only_with_order_by(sql_task):
    ex = pick(sql_task, "department_by_salary")
    assert ex.meta["ordered"]
    reversed_order = ex.reference.replace("DESC", "ASC")
    assert not sql_task.score(reversed_order, ex).correct
    unordered = pick(sql_task, "department_employees")
    assert sql_task.score(unordered.reference + " ORDER BY e.name DESC", unordered).correct


def test_sql_extracts_the_query_from_model_text(sql_task):
    ex = pick(sql_task, "count_city")
    fenced = f"Here is the query:\n```sql\n{ex.reference};\n```\nIt counts the employees."
    v = sql_task.score(fenced, ex)
    assert v.correct and v.extracted == ex.reference
    assert sql_task.score(f"```\n{ex.reference}\n```", ex).correct
    assert sql_task.score(f"{ex.reference}; -- counts employees\nDROP TABLE employees;", ex).correct
    assert sql_task.score(f"{ex.reference}\n\nThis query counts the employees.", ex).correct
    assert extract_sql("```python\nprint(1)\n```\n```sql\nSELECT 1\n```") == "SELECT 1"
    assert extract_sql("SELECT 'a;b' FROM t; SELECT 2") == "SELECT 'a;b' FROM t"
    assert extract_sql("```sql\nSELECT 3") == "SELECT 3"  # cut off by the token limit: still scored


def test_sql_runaway_query_is_stopped(sql_task):
    ex = pick(sql_task, "count_city")
    # Counts to 10^8: about 30 s unchecked, so a broken time limit fails the test instead of hanging it.
    forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000000) SELECT COUNT(*) FROM c"
    sql_task.timeout_s = 0.3
    try:
        t = time.perf_counter()
        v = sql_task.score(forever, ex)
        assert time.perf_counter() - t < 3
        assert not v.correct and "timed out" in v.error
    finally:
        sql_task.timeout_s = 2.0
    with pytest.raises(SqlError, match="more than 100 rows"):  # an endless result hits the row cap
        execute(ex.meta["db"], "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
                max_rows=100)


def test_sql_writes_are_refused(sql_task, tmp_path, monkeypatch):
    ex = pick(sql_task, "count_city")
    db = ex.meta["db"]
    before = dump(db)
    for sql in ["DELETE FROM employees", "INSERT INTO departments VALUES (99, 'Spies')",
                "UPDATE employees SET salary = 0", "DROP TABLE employees", "CREATE TABLE t (x)",
                f"ATTACH DATABASE '{tmp_path / 'new.db'}' AS x", "PRAGMA journal_mode = WAL"]:
        v = sql_task.score(sql, ex)
        assert not v.correct and v.error.startswith("sql error:"), sql
    assert dump(db) == before
    assert not (tmp_path / "new.db").exists()
    # The connection itself is read-only: with the authorizer allowing everything, writes still fail.
    import tunesmith.data.tasks.sql as sql_module

    monkeypatch.setattr(sql_module, "_authorize", lambda *args: sqlite3.SQLITE_OK)
    with pytest.raises(SqlError, match="readonly"):
        execute(db, "DELETE FROM employees")
    assert dump(db) == before
    with pytest.raises(SqlError, match="not found"):
        execute(tmp_path / "missing.sqlite", "SELECT 1")


def test_score_sql_for_task_files(sql_task):
    ex = pick(sql_task, "top_paid_city")
    assert score_sql(ex.reference, ex.reference, ex.meta["db"]).correct  # ordered inferred from ORDER BY
    swapped = ex.reference.replace("DESC", "ASC")
    assert not score_sql(swapped, ex.reference, ex.meta["db"]).correct


# ----------------------------------------------------------------------------- json task


def test_json_is_deterministic_and_disjoint(json_task):
    again, other = ExtractTask(seed=0), ExtractTask(seed=1, **SMALL)
    for split in SPLITS:
        assert as_tuples(again.examples(split)) == as_tuples(json_task.examples(split))
    assert [e.prompt for e in other.examples("test")] != [e.prompt for e in json_task.examples("test")][:60]
    assert {s: len(json_task.examples(s)) for s in SPLITS} == {"train": 800, "validation": 100, "test": 200}
    assert_disjoint_splits(json_task, JSON_FAMILIES)


def test_json_gold_scores_correct_and_prompts_are_short(json_task, tokenizer):
    for split in SPLITS:
        for ex in json_task.examples(split):
            assert ex.reference == json.dumps(json.loads(ex.reference), sort_keys=True)
            v = json_task.score(ex.reference, ex)
            assert v.correct and v.score == 1.0
    longest = max(len(tokenizer(e.prompt + e.reference)["input_ids"]) for e in json_task.examples("test"))
    assert longest <= 110


def test_json_partial_credit_and_bad_output(json_task):
    ex = json_task.examples("test")[0]
    gold = json.loads(ex.reference)
    v = json_task.score(f"Sure:\n```json\n{json.dumps(gold, indent=2)}\n```", ex)
    assert v.correct and v.score == 1.0
    one_wrong = dict(gold, city="Atlantis")
    v = json_task.score(json.dumps(one_wrong), ex)
    assert not v.correct and v.score == pytest.approx(4 / 5)
    v = json_task.score(json.dumps(dict(gold, quantity=str(gold["quantity"]))), ex)
    assert not v.correct and v.score == pytest.approx(4 / 5)  # "3" is not 3
    v = json_task.score(json.dumps(dict(gold, note="rush")), ex)
    assert not v.correct and v.score == pytest.approx(5 / 6)  # an extra key costs too
    missing = {k: gold[k] for k in list(gold)[:3]}
    assert json_task.score(json.dumps(missing), ex).score == pytest.approx(3 / 5)
    v = json_task.score("name: Anna, item: lamp", ex)
    assert not v.correct and v.score == 0.0 and v.error.startswith("unparsable JSON")
    assert json_task.score("{'name': 'Anna'}", ex).error.startswith("unparsable JSON")


# ----------------------------------------------------------------------------- registry and records


def test_get_task_and_records(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    assert {"sql", "json", "retrieval", "intent"} <= set(BUILTIN)
    with pytest.raises(ValueError, match="built-in tasks: .*json, .*retrieval, sql"):
        get_task("sqll")
    task = get_task("json", seed=3, **SMALL)
    assert isinstance(task, ExtractTask) and task.seed == 3
    records = task_records(task, "validation")
    assert len(records) == 40
    msgs = records[0]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"] == task.examples("validation")[0].prompt
    assert msgs[2]["content"] == task.examples("validation")[0].reference
    with pytest.raises(ValueError, match="unknown split"):
        task_records(task, "dev")
    # The data pipeline reads a task split by name; the database lands in the cache folder.
    from tunesmith.data.sources import read_records

    first = next(iter(read_records("task:sql/test")))
    assert first.where == "task:sql/test[#0]" and first.fields["messages"][-1]["content"].startswith("SELECT ")
    assert list((tmp_path / "tasks").glob("sql-0-*.sqlite"))
