"""Caption processing: cleanup, tag shuffling, tag dropout, caption dropout, prefix.

A caption is a comma-separated list of tags ("1girl, solo, red hair, masterpiece, safe") or plain text (one tag).
The first `keep_tokens` and the last `keep_last` tags (quality, rating) never move and are never dropped; only the
tags between are shuffled / dropped, with the `random.Random` passed in: a caption is a pure function of (text,
config, rng state). Cleanup only touches whitespace and separators: "(tag:1.2)" is kept as literal text.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionConfig:
    shuffle_tags: bool = False
    keep_tokens: int = 0  # the first N tags stay first, in order
    keep_last: int = 2  # the seed's rule: the last two tags (quality, rating) stay last
    tag_dropout: float = 0.0  # probability of dropping each movable tag
    caption_dropout: float = 0.0  # probability of returning "" (the unconditional caption for CFG)
    prefix: str = ""  # prepended as the first tag (a trigger word), never shuffled or dropped

    def __post_init__(self):
        if self.keep_tokens < 0 or self.keep_last < 0:
            raise ValueError(f"keep_tokens and keep_last must be >= 0, got {self.keep_tokens}, {self.keep_last}")
        for name in ("tag_dropout", "caption_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def is_random(self) -> bool:
        """True when the same caption can come out differently: text embeddings cannot be cached then."""
        return self.shuffle_tags or self.tag_dropout > 0 or self.caption_dropout > 0


def split_tags(text: str) -> list[str]:
    """Comma-separated tags, each with its whitespace collapsed and stripped; empty tags removed."""
    tags = (" ".join(t.split()) for t in text.split(","))
    return [t for t in tags if t]


def clean_caption(text: str) -> str:
    """Collapse whitespace runs, strip, and normalise separators to ", " ("a ,b,,  c " -> "a, b, c")."""
    return ", ".join(split_tags(text))


def process_caption(text: str, cfg: CaptionConfig, rng: random.Random) -> str:
    """Apply caption dropout, then tag shuffling / dropout between the fixed head and tail, then the prefix."""
    # Draw the caption-dropout coin first and always, so the rng stream does not depend on the outcome.
    if cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
        return ""
    tags = split_tags(text)
    head_n = min(cfg.keep_tokens, len(tags))
    tail_n = min(cfg.keep_last, len(tags) - head_n)
    head, middle, tail = tags[:head_n], tags[head_n:len(tags) - tail_n], tags[len(tags) - tail_n:]
    if cfg.shuffle_tags:
        rng.shuffle(middle)
    if cfg.tag_dropout > 0:
        middle = [t for t in middle if rng.random() >= cfg.tag_dropout]
    return ", ".join(split_tags(cfg.prefix) + head + middle + tail)
