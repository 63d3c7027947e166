"""The recipe's `prepare:` block: what `tunesmith data prepare RECIPE` cleans and how.

It lives beside the pipeline (as a method's options live beside the method); `recipe.py` adds it to
the recipe as `prepare`. The record format, columns, max_length and masking come from the recipe's
`data` section, so the shards hold exactly the samples `train` would build from the same files.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...config import Config


class FilterConfig(Config):
    """Heuristic quality filters in the spirit of Gopher/FineWeb/Yi; each is one step with its own drop
    count, and a limit set to null switches that filter off."""

    min_words: int | None = Field(1, ge=0)
    "Drop records with fewer words than this (system prompts not counted)."
    max_words: int | None = Field(None, gt=0)
    "Drop records with more words than this."
    max_symbol_ratio: float | None = Field(0.5, ge=0, le=1)
    "Drop records whose non-space characters are more than this share symbols (neither letters nor digits)."
    max_dup_line_ratio: float | None = Field(0.3, ge=0, le=1)
    "Drop records in which more than this share of the lines (of 3 or more) repeat an earlier line."
    max_top_ngram_ratio: float | None = Field(0.2, ge=0, le=1)
    "Drop records (of 50+ words) in which the most frequent word 2-gram covers more than this share of the characters."
    max_dup_ngram_ratio: float | None = Field(0.15, ge=0, le=1)
    "Drop records (of 50+ words) in which word 5-grams seen earlier in the record cover more than this share of the characters."
    languages: list[str] = Field(default_factory=list)
    "Keep only these languages (ISO 639-1 codes, e.g. [en]) by langid's offline model; empty: no language filter."
    min_language_prob: float = Field(0.5, ge=0, le=1)
    "With `languages`: also drop records langid gives less than this probability."


class PiiConfig(Config):
    enabled: bool = False
    "Replace e-mail addresses, phone numbers and secret keys in the text before near-dedup and tokenizing."
    emails: bool = True
    "Replace e-mail addresses with `<EMAIL>`."
    phones: bool = True
    "Replace phone numbers (9 to 15 digits, international or grouped) with `<PHONE>`."
    keys: bool = True
    "Replace secret keys (cloud/API tokens, private key blocks, `password=...` values) with `<KEY>`."


class NearDedupConfig(Config):
    enabled: bool = True
    "Remove near-duplicates: a record whose MinHash-LSH estimate says it is similar to a kept one."
    threshold: float = Field(0.8, gt=0, lt=1)
    "Jaccard similarity of word shingles from which two records count as near-duplicates (MinHash estimate within 2 standard errors)."
    num_perm: int = Field(128, ge=16)
    "MinHash permutations: more estimate similarity better and cost more time and memory."
    shingle: int = Field(3, gt=0)
    "Words per shingle (a record shorter than this is one shingle)."


class PrepareConfig(Config):
    inputs: list[str] = Field(default_factory=list)
    "Sources to clean: files, folders (their .jsonl/.json/.csv/.parquet/.txt files), globs or any data.train source; empty: data.train."
    output: str = "prepared"
    "Folder for the tokenized shards, report.json, report.md and near_duplicates.jsonl."
    tokenize: bool = True
    "Render and tokenize the kept records into shards with the model's tokenizer (false: clean only)."
    write_jsonl: bool = False
    "Also write the kept records, cleaned, to cleaned.jsonl (text or messages, plus domain)."
    workers: int = Field(1, ge=0)
    "Processes that normalise, filter and MinHash records (0: one per CPU core); the result is the same."
    normalise: Literal["nfc", "nfkc", "none"] = "nfc"
    "Unicode normal form the text is put in (line ends become \\n, control characters go, ends are stripped)."
    exact_dedup: bool = True
    "Remove exact duplicates: same text after case folding, dropping punctuation and collapsing spaces."
    filters: FilterConfig = Field(default_factory=FilterConfig)
    "Quality filters, applied in this order after exact dedup."
    pii: PiiConfig = Field(default_factory=PiiConfig)
    "PII scrubbing (off by default)."
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig)
    "Near-duplicate removal by MinHash-LSH (datasketch)."
