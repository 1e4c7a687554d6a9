"""Module-name patterns from untrusted files (a LoRA's `alpha_pattern` / `rank_pattern`), matched
without backtracking.

PEFT writes these as Python regexes, and a downloaded file could hold `([a-z_.0-9]+)+!`, which makes
`re` run for hours. We accept the subset real adapters use and match it with a linear-time NFA
simulation (time ∝ pattern length × name length, no backtracking), so no pattern can hang a run:

  * literal characters; `\\.` and other escaped punctuation; `\\d`, `\\w`, `\\s`; `.`; `[...]` classes
    (ranges, `^` negation, `\\d`/`\\w` inside);
  * each of those followed by at most one of `*`, `+`, `?`;
  * `|` alternatives and unquantified `( … )` / `(?: … )` groups (expanded into alternatives,
    at most MAX_ALTERNATIVES); `^` at the start and `$` at the end (a pattern is matched whole anyway).

Anything else (a quantified group, `{m,n}`, backreferences, lookarounds, an unbalanced bracket) is a
PatternError naming what is not supported; longer than MAX_PATTERN_CHARS is refused too.
"""

from __future__ import annotations

MAX_PATTERN_CHARS = 512
MAX_ALTERNATIVES = 64
_CLASSES = {"d": lambda c: c.isdigit(), "w": lambda c: c.isalnum() or c == "_", "s": lambda c: c.isspace()}


class PatternError(ValueError):
    """A pattern outside the supported subset (the caller wraps it in its own typed error)."""


def _escape(ch: str):
    if ch in _CLASSES:
        return _CLASSES[ch]
    if ch.isalnum():
        raise PatternError(f"the escape \\{ch} is not supported")
    return lambda c, ch=ch: c == ch


def _char_class(pattern: str, i: int):
    """Parse `[...]` starting after '['; returns (predicate, index after ']')."""
    negate = i < len(pattern) and pattern[i] == "^"
    i += negate
    tests, first = [], True
    while i < len(pattern) and (pattern[i] != "]" or first):
        first = False
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            tests.append(_escape(pattern[i + 1]))
            i += 2
            continue
        if i + 2 < len(pattern) and pattern[i + 1] == "-" and pattern[i + 2] != "]":
            lo, hi = ch, pattern[i + 2]
            tests.append(lambda c, lo=lo, hi=hi: lo <= c <= hi)
            i += 3
            continue
        tests.append(lambda c, ch=ch: c == ch)
        i += 1
    if i >= len(pattern):
        raise PatternError("unterminated [ character class")
    return (lambda c: any(t(c) for t in tests) != negate), i + 1


def _alternatives(pattern: str, i: int, depth: int) -> tuple[list[list], int]:
    """Parse alternatives until ')' or the end: a list of atom sequences; returns (seqs, index)."""
    done: list[list] = []
    current: list[list] = [[]]  # the alternatives the next atom extends (a group multiplies them)
    while i < len(pattern) and pattern[i] != ")":
        ch = pattern[i]
        if ch == "|":
            done, current = done + current, [[]]
            i += 1
            continue
        if ch == "(":
            start = i + 3 if pattern.startswith("(?:", i) else i + 1
            if pattern.startswith("(?", i) and start == i + 1:
                raise PatternError("lookarounds, flags and named groups are not supported")
            inner, i = _alternatives(pattern, start, depth + 1)
            if i >= len(pattern):
                raise PatternError("unbalanced '(': missing ')'")
            i += 1
            if i < len(pattern) and pattern[i] in "*+?{":
                raise PatternError("a quantified group is not supported (it can backtrack catastrophically)")
            current = [c + t for c in current for t in inner]
        else:
            atom: list = []
            i = _atom(pattern, i, atom)
            current = [c + atom for c in current]
        if len(done) + len(current) > MAX_ALTERNATIVES:
            raise PatternError(f"more than {MAX_ALTERNATIVES} alternatives")
    if depth == 0 and i < len(pattern):
        raise PatternError("unbalanced ')'")
    return done + current, i


def _atom(pattern: str, i: int, seq: list) -> int:
    ch = pattern[i]
    if ch in "*+?{":
        raise PatternError(f"'{ch}' with nothing (or a quantifier) before it" if ch != "{" else
                           "{m,n} repetition is not supported")
    if ch == "^" and i == 0 or ch == "$" and i == len(pattern) - 1:
        return i + 1
    if ch == "\\":
        if i + 1 >= len(pattern):
            raise PatternError("a trailing backslash")
        test, i = _escape(pattern[i + 1]), i + 2
    elif ch == "[":
        test, i = _char_class(pattern, i + 1)
    elif ch == ".":
        test, i = (lambda c: c != "\n"), i + 1
    elif ch in "^$":
        raise PatternError(f"'{ch}' is only supported at the start / end")
    else:
        test, i = (lambda c, ch=ch: c == ch), i + 1
    quant = pattern[i] if i < len(pattern) and pattern[i] in "*+?" else ""
    if quant:
        i += 1
        if i < len(pattern) and pattern[i] in "*+?{":
            raise PatternError("stacked quantifiers are not supported")
    seq.append((test, quant))
    return i


def compile_pattern(pattern: str) -> list[list]:
    """The pattern's alternatives (each a list of (test, quantifier)); PatternError when unsupported."""
    if not isinstance(pattern, str):
        raise PatternError(f"a pattern must be a string, found {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"longer than {MAX_PATTERN_CHARS} characters")
    seqs, _ = _alternatives(pattern, 0, 0)
    return seqs


def _closure(seq: list, states: set[int]) -> set[int]:
    todo, seen = list(states), set(states)
    while todo:
        s = todo.pop()
        if s < len(seq) and seq[s][1] in ("*", "?") and s + 1 not in seen:
            seen.add(s + 1)
            todo.append(s + 1)
    return seen


def _fullmatch(seq: list, text: str) -> bool:
    states = _closure(seq, {0})
    for c in text:
        nxt = set()
        for s in states:
            if s < len(seq) and seq[s][0](c):
                nxt.add(s + 1)
                if seq[s][1] in ("*", "+"):
                    nxt.add(s)  # stay: one more repetition
        states = _closure(seq, nxt)
        if not states:
            return False
    return len(seq) in states


def matches(compiled: list[list], text: str) -> bool:
    """True when some alternative matches all of `text`."""
    return any(_fullmatch(seq, text) for seq in compiled)


def matches_module(compiled: list[list], name: str) -> bool:
    """PEFT's rule: the pattern matches the whole module name or a dotted suffix of it (`(.*\\.)?pattern`)."""
    starts = [0] + [i + 1 for i, c in enumerate(name) if c == "."]
    return any(matches(compiled, name[s:]) for s in starts)
