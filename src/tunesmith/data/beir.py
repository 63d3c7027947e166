"""The BEIR folder format: the local layout most retrieval benchmarks ship in.

    folder/corpus.jsonl      {"_id": "d1", "title": "...", "text": "..."}   (title optional)
    folder/queries.jsonl     {"_id": "q1", "text": "..."}
    folder/qrels/test.tsv    query-id <TAB> corpus-id <TAB> score        (a header line first)

    corpus, queries, qrels = load_beir("folder")          # split="test" reads qrels/test.tsv

Mistakes are reported as `file:line: field ...`, like the training data formats. Ids are strings
(a number in JSON becomes its decimal text, as BEIR's own loader does).
"""
from __future__ import annotations

from pathlib import Path

from ..jsonl import read_jsonl
from .errors import DataError

Corpus = dict  # document id -> {"title": str, "text": str}


class BeirError(DataError):
    """A BEIR folder that cannot be read; the message starts with `file:line` and names the field."""


def _id(where: str, record: dict) -> str:
    value = record.get("_id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise BeirError(f"{where}: field `_id` must be a non-empty string (got {value!r})")
    return str(value)


def _text(where: str, record: dict, name: str, required: bool = True) -> str:
    value = record.get(name, None if required else "")
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise BeirError(f"{where}: field `{name}` is {what}")
    return value


def _objects(path: Path):
    if not path.is_file():
        raise BeirError(f"{path}: file not found (a BEIR folder has corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    for where, value in read_jsonl(path, BeirError):
        if not isinstance(value, dict):
            raise BeirError(f"{where}: expected a JSON object, got {type(value).__name__}")
        yield where, value


def read_corpus(path: str | Path) -> Corpus:
    """corpus.jsonl: document id -> {"title", "text"}; a repeated `_id` is an error."""
    corpus: Corpus = {}
    for where, record in _objects(Path(path)):
        doc_id = _id(where, record)
        if doc_id in corpus:
            raise BeirError(f"{where}: field `_id` {doc_id!r} appears twice")
        corpus[doc_id] = {"title": _text(where, record, "title", required=False),
                          "text": _text(where, record, "text")}
    if not corpus:
        raise BeirError(f"{path}: no documents")
    return corpus


def read_queries(path: str | Path) -> dict[str, str]:
    """queries.jsonl: query id -> text."""
    queries: dict[str, str] = {}
    for where, record in _objects(Path(path)):
        qid = _id(where, record)
        if qid in queries:
            raise BeirError(f"{where}: field `_id` {qid!r} appears twice")
        queries[qid] = _text(where, record, "text")
    return queries


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """qrels/<split>.tsv: query id -> {document id: grade}. The first line is the header."""
    path = Path(path)
    if not path.is_file():
        raise BeirError(f"{path}: file not found (relevance judgements: query-id, corpus-id, score per line)")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if line_no == 1 or not line.strip():
                continue  # the header (query-id corpus-id score), blank lines
            where = f"{path}:{line_no}"
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 3:
                raise BeirError(f"{where}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                                f"got {len(parts)}")
            qid, doc_id, grade = (p.strip() for p in parts)
            for name, value in (("query-id", qid), ("corpus-id", doc_id)):
                if not value:
                    raise BeirError(f"{where}: field `{name}` is empty")
            try:
                qrels.setdefault(qid, {})[doc_id] = int(float(grade))
            except ValueError:
                raise BeirError(f"{where}: field `score` must be a whole number, got {grade!r}") from None
    if not qrels:
        raise BeirError(f"{path}: no judgements")
    return qrels


def _check_ids(path: Path, qrels: dict, queries: dict, corpus: Corpus) -> None:
    """Every judged query and document must exist; the first that does not is reported with its line."""
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            parts = [p.strip() for p in line.rstrip("\r\n").split("\t")]
            if line_no == 1 or len(parts) != 3:
                continue
            if parts[0] not in queries:
                raise BeirError(f"{path}:{line_no}: field `query-id` {parts[0]!r} is not in queries.jsonl")
            if parts[1] not in corpus:
                raise BeirError(f"{path}:{line_no}: field `corpus-id` {parts[1]!r} is not in corpus.jsonl")


def load_beir(folder: str | Path, split: str = "test") -> tuple[Corpus, dict[str, str], dict[str, dict[str, int]]]:
    """(corpus, queries, qrels) of a BEIR folder; the qrels come from qrels/<split>.tsv."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BeirError(f"{folder}: not a folder (a BEIR folder has corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")
    corpus = read_corpus(folder / "corpus.jsonl")
    queries = read_queries(folder / "queries.jsonl")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_path)
    _check_ids(qrels_path, qrels, queries, corpus)
    return corpus, queries, qrels


def write_beir(folder: str | Path, corpus: Corpus, queries: dict[str, str], qrels: dict[str, dict[str, int]],
               split: str = "test") -> Path:
    """Write (corpus, queries, qrels) as a BEIR folder (e.g. the built-in task, for other tools)."""
    import json

    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc_id, doc in corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": doc.get("title", ""), "text": doc["text"]}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(folder / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, judged in qrels.items():
            for doc_id, grade in judged.items():
                f.write(f"{qid}\t{doc_id}\t{grade}\n")
    return folder
