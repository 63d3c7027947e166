"""Per-record cleaning that needs no state: Unicode normalisation, the text that dedup and the filters
look at, the exact-dedup key, and PII scrubbing.

A record is first turned into its Example (`formats.to_example`: text, or chat messages for chat and
instruction records), so a bad record fails here with its location, and the cleaned record is written
in one canonical form. The text that dedup and filters see leaves system messages out: a system prompt
shared by every record would make them all look alike to near-dedup.
"""
from __future__ import annotations

import hashlib
import re
import string
import unicodedata

from ..formats import Example
from ..tools import answer_text, like

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # control characters but \t \n \r
_PUNCT_OR_SPACE = re.compile(r"[\W_]+")  # anything that is not a letter or digit
_ASCII_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})


def normalise_text(text: str, form: str) -> str:
    """`form` ('nfc', 'nfkc' or 'none') applied, line ends made \\n, control characters removed, ends stripped."""
    if form != "none":
        text = unicodedata.normalize(form.upper(), text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text).strip()


def map_example(example: Example, fn) -> Example:
    """The example with `fn` applied to its text (or to every message's content)."""
    if isinstance(example, str):
        return fn(example)
    return like(example, [{**m, "content": fn(m["content"])} for m in example])  # tools kept


def content_text(example: Example) -> str:
    """What dedup and the quality filters judge: the text, or the non-system messages joined by lines
    (an assistant turn's tool calls included: two chats that differ only in their calls differ)."""
    if isinstance(example, str):
        return example
    return "\n".join(answer_text(m) for m in example if m["role"] != "system")


def exact_key(text: str) -> int:
    """A 64-bit hash of the text with case folded, punctuation dropped and spaces collapsed: two records
    with the same key say the same thing in the same words. A text of symbols only keeps its symbols
    (so `!!!` and `???` differ). Never 0 (0 marks an empty slot)."""
    if text.isascii():  # the common case, 2-3x faster than the regex (which it equals on ASCII)
        canonical = " ".join(text.lower().translate(_ASCII_PUNCT_TO_SPACE).split())
    else:
        canonical = _PUNCT_OR_SPACE.sub(" ", text.casefold()).strip()
    if not canonical:
        canonical = "\0" + " ".join(text.split())
    key = int.from_bytes(hashlib.blake2b(canonical.encode(), digest_size=8).digest(), "little")
    return key or 1


# --------------------------------------------------------------------------------------------------
# PII

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# An optional +country code, then groups of digits joined by one space, dot, dash or a (area code).
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?![\w])")
_KEYS = re.compile(
    "|".join([
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
        r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key id
        r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",  # GitHub tokens
        r"\bgithub_pat_[A-Za-z0-9_]{40,}\b",
        r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}",  # OpenAI / Anthropic style secret keys
        r"\bxox[abprs]-[A-Za-z0-9-]{10,}",  # Slack
        r"\bAIza[0-9A-Za-z_-]{35}\b",  # Google API key
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
    ])
)
# `password = hunter2`, `api_key: "abc..."`: the value after a secret-sounding name.
_ASSIGNED = re.compile(r"(?i)\b((?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd)"
                       r"[\"']?\s*[:=]\s*[\"']?)([^\s\"',;]{6,})")


def _phone(match: re.Match) -> str:
    """Only 9 to 15 digits with a separator or a + make a phone number (not a year, a price or an id)."""
    s = match.group(0)
    digits = sum(c.isdigit() for c in s)
    if 9 <= digits <= 15 and (s.startswith("+") or any(c in s for c in " .-()")):
        return "<PHONE>"
    return s


def scrub_pii(text: str, emails: bool, phones: bool, keys: bool, counts: dict[str, int]) -> str:
    """The text with PII replaced by `<EMAIL>`, `<PHONE>`, `<KEY>`; `counts` gains what was replaced."""
    if keys:
        text, n = _KEYS.subn("<KEY>", text)
        text, m = _ASSIGNED.subn(lambda g: g.group(1) + "<KEY>", text)
        counts["keys"] = counts.get("keys", 0) + n + m
    if emails and "@" in text:
        text, n = _EMAIL.subn("<EMAIL>", text)
        counts["emails"] = counts.get("emails", 0) + n
    if phones:
        before = text.count("<PHONE>")
        text = _PHONE.sub(_phone, text)
        counts["phones"] = counts.get("phones", 0) + text.count("<PHONE>") - before
    return text
