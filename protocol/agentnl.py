"""Goals as sentences: the built-in parser of the sentence forms of specs/agent.md,
"Sentences". A sentence becomes a goal document, checked as a goal file is.

    train MODEL on DATASET [CLAUSE]...

    CLAUSE:  to loss X | to a loss of X | until loss X | below loss X
             within N tasks | in N tasks | within N worker-seconds | within N minutes
             | spending N reward units
             with W workers per round | N branches at once | population N | seed N

MODEL and DATASET are 64-hex version ids, or names the caller resolves (``names``:
``"model:NAME"`` / ``"dataset:NAME"`` -> version id, e.g. the versions a node holds).
Clauses may come in any order, each at most once, joined by spaces, commas or "and".
Anything else is refused with :class:`SentenceError` saying what was not understood.

This module imports the standard library and protocol/ only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from protocol.agentgoal import Goal, goal_from_toml_dict

MAX_SENTENCE = 1000

_NUM = r"(\d+(?:\.\d+)?(?:e-?\d+)?)"
_INT = r"(\d{1,12})"
_HEAD = re.compile(r"\s*(?:please\s+)?train\s+(\S+)\s+on\s+(\S+)(.*)$", re.I | re.S)
# (name, pattern, what it sets); each matched at the start of what is left.
_CLAUSES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.I)) for name, pattern in (
        ("target", rf"(?:to\s+(?:a\s+)?(?:held-out\s+)?loss(?:\s+of)?|until\s+loss"
                   rf"(?:\s*<=)?|below\s+loss)\s+{_NUM}"),
        ("tasks", rf"(?:within|in)\s+{_INT}\s+(?:micro-?)?tasks?"),
        ("worker_seconds", rf"(?:within|in)\s+{_INT}\s+worker[- ]seconds?"),
        ("minutes", rf"(?:within|in)\s+{_INT}\s+(?:worker[- ])?minutes?"),
        ("reward_pool", rf"spending\s+{_INT}\s+(?:reward\s+)?units?"),
        ("workers", rf"with\s+{_INT}\s+workers?\s+per\s+round"),
        ("parallel", rf"{_INT}\s+branch(?:es)?\s+at\s+once"),
        ("population", rf"(?:with\s+)?(?:a\s+)?population(?:\s+of)?\s+{_INT}"),
        ("seed", rf"seed\s+{_INT}"),
    ))
_JOINER = re.compile(r"(?:\s*,\s*|\s+and\s+|\s*)", re.I)  # always matches
_HEX64 = re.compile(r"[0-9a-f]{64}")


class SentenceError(ValueError):
    """A sentence the built-in parser does not understand (the message says where)."""


def _version(kind: str, word: str, names: Mapping[str, str]) -> str:
    if _HEX64.fullmatch(word.lower()):
        return word.lower()
    found = names.get(f"{kind}:{word}")
    if found is None:
        raise SentenceError(f"{kind} {word!r}: not a version id, and no {kind} of that "
                            "name is known here")
    return found


def sentence_doc(text: str, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The goal document of a sentence (see the module docstring); SentenceError."""
    if not isinstance(text, str) or not text.strip():
        raise SentenceError("an empty sentence")
    if len(text) > MAX_SENTENCE:
        raise SentenceError(f"longer than {MAX_SENTENCE} characters")
    head = _HEAD.match(text.strip().rstrip("."))
    if head is None:
        raise SentenceError('expected "train MODEL on DATASET ..."')
    names = {} if names is None else names
    doc: dict[str, Any] = {"name": f"{head.group(1)} on {head.group(2)}"[:100],
                           "base_model": _version("model", head.group(1), names),
                           "dataset": _version("dataset", head.group(2), names)}
    rest, seen = head.group(3), set()
    while True:
        joiner = _JOINER.match(rest)
        assert joiner is not None  # the pattern matches the empty string
        rest = rest[joiner.end():]
        if not rest:
            break
        found = next(((n, m) for n, p in _CLAUSES if (m := p.match(rest)) is not None), None)
        if found is None:
            raise SentenceError(f"not understood: {rest[:40]!r}")
        name, m = found
        if name in seen:
            raise SentenceError(f"{name.replace('_', ' ')} given twice")
        seen.add(name)
        value = m.group(1)
        if name == "target":
            doc.setdefault("objective", {})["target"] = float(value)
        elif name in ("tasks", "worker_seconds", "reward_pool"):
            doc.setdefault("budget", {})[name] = int(value)
        elif name == "minutes":
            doc.setdefault("budget", {})["worker_seconds"] = int(value) * 60
        elif name == "workers":
            doc.setdefault("train", {})["workers_per_round"] = int(value)
        else:
            doc.setdefault("search", {})[name] = int(value)
        rest = rest[m.end():]
    if "budget" not in doc:
        raise SentenceError('no budget: say "within N tasks" (or N worker-seconds, or '
                            "spending N reward units)")
    if {"worker_seconds", "minutes"} <= seen:
        raise SentenceError("worker-seconds and minutes both given; give one")
    return doc


def parse_sentence(text: str, names: Mapping[str, str] | None = None) -> Goal:
    """A checked goal from a sentence: SentenceError, or GoalError naming the field."""
    return goal_from_toml_dict(sentence_doc(text, names))
