"""Query fingerprints: a hash of the text with constants and whitespace normalized."""

from __future__ import annotations

import hashlib
import re

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"--[^\n]*"), " "),
    (re.compile(r"/\*.*?\*/", re.S), " "),
    (re.compile(r"(?:[eEbBxXuU]&?)?'(?:[^']|'')*'?"), "?"),
    (re.compile(r"\$[0-9]+"), "?"),
    (re.compile(r"(?<![\w$])-?(?:0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"), "?"),
    (re.compile(r"\(\s*\?(?:\s*,\s*\?)+\s*\)"), "(?)"),
    (re.compile(r"\s+"), " "),
)


def normalize(text: str) -> str:
    """Lower-cased text with literals, parameters and lists replaced by '?'."""
    out = text
    for pattern, repl in _PATTERNS:
        out = pattern.sub(repl, out)
    return out.strip().rstrip(";").strip().lower()


def fingerprint(text: str) -> str:
    """16 hex digits identifying the normalized text ('' for no text)."""
    if not text:
        return ""
    return hashlib.blake2b(normalize(text).encode(), digest_size=8).hexdigest()
