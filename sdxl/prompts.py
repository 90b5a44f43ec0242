"""Prompt emphasis in AUTOMATIC1111's syntax, opt-in (`DualCLIP.encode(prompts, weighting=True)`).

    (word) x1.1    ((word)) x1.21    (word:1.3) x1.3    [word] /1.1    \\( \\) \\[ \\] literal brackets
    BREAK (a word of its own, in capitals) ends the 75-token chunk: what follows starts a new one.
Unclosed brackets close at the end of the prompt, as in A1111. The text encoders then scale each token's hidden
state by its weight and multiply the chunk by (mean before / mean after), so the chunk keeps its original mean
(A1111's "Original" emphasis). Off by default: captions with brackets are taken literally.
"""
from __future__ import annotations

import re

# A1111's modules/prompt_parser.py tokens; the weight after ':' must be a number (A1111 fails on e.g. "(a:1.2.)").
_TOKENS = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = ("BREAK", -1.0)  # the fragment that ends a chunk


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """(text, weight) fragments, neighbours of equal weight merged: "an (important) word" ->
    [("an ", 1.0), ("important", 1.1), (" word", 1.0)]; BREAK gives the fragment `BREAK`."""
    res: list[list] = []
    rounds, squares = [], []  # where each open bracket's range starts

    def multiply(start: int, w: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= w

    for m in _TOKENS.finditer(text):
        s, weight = m[0], m[1]
        if s.startswith("\\"):
            res.append([s[1:], 1.0])
        elif s in "([":
            (rounds if s == "(" else squares).append(len(res))
        elif weight is not None and rounds:
            multiply(rounds.pop(), float(weight))
        elif s == ")" and rounds:
            multiply(rounds.pop(), 1.1)
        elif s == "]" and squares:
            multiply(squares.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(s)):
                res += [list(BREAK)] * (i > 0) + [[part, 1.0]]
    for start in rounds:
        multiply(start, 1.1)
    for start in squares:
        multiply(start, 1 / 1.1)
    merged: list[list] = []
    for s, w in res or [["", 1.0]]:
        if merged and merged[-1][1] == w:
            merged[-1][0] += s
        else:
            merged.append([s, w])
    return [(s, w) for s, w in merged]


def chunk_tokens(fragments: list[tuple[str, float]], ids: list[list[int]], n: int) -> list[list[tuple[int, float]]]:
    """A prompt's (token id, weight) pairs in chunks of at most n tokens; `ids` are the fragments' token ids. A
    BREAK closes the chunk (even an empty one); a trailing empty chunk is dropped, as A1111's tokenize_line does."""
    chunks: list[list[tuple[int, float]]] = [[]]
    for (text, w), tokens in zip(fragments, ids):
        if (text, w) == BREAK:
            chunks.append([])
            continue
        for t in tokens:
            if len(chunks[-1]) == n:
                chunks.append([])
            chunks[-1].append((t, w))
    return chunks[:-1] if len(chunks) > 1 and not chunks[-1] else chunks
