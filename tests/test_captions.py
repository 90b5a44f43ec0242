"""Caption rules: cleanup, keep_tokens, the fixed last two tags, tag / caption dropout, prefix, determinism."""
from __future__ import annotations

import random

import pytest

from training.captions import CaptionConfig, clean_caption, process_caption

CAPTION = "1girl, solo, red hair, smile, outdoors, sky, tree, masterpiece, safe"
TAGS = CAPTION.split(", ")


def test_clean_caption():
    assert clean_caption("  a ,b,,  c  ") == "a, b, c"
    assert clean_caption("long   hair,\tblue\n eyes ,") == "long hair, blue eyes"
    assert clean_caption("") == "" and clean_caption(" , ,") == ""
    # prompt-weighting syntax is plain text here: neither parsed nor removed
    assert clean_caption("(red hair:1.2),  [smile]") == "(red hair:1.2), [smile]"
    # no processing options: the caption comes back cleaned and otherwise untouched
    assert process_caption(" a photo  of a cat ", CaptionConfig(), random.Random(0)) == "a photo of a cat"


def test_shuffle_keeps_head_and_last_two():
    cfg = CaptionConfig(shuffle_tags=True, keep_tokens=2)
    orders = set()
    for seed in range(30):
        out = process_caption(CAPTION, cfg, random.Random(seed)).split(", ")
        assert out[:2] == TAGS[:2] and out[-2:] == TAGS[-2:]
        assert sorted(out[2:-2]) == sorted(TAGS[2:-2])
        orders.add(tuple(out))
    assert len(orders) > 10  # 5 movable tags: 120 orders
    # the shuffle is rng.shuffle of the middle, computed independently here
    rng = random.Random(4)
    middle = TAGS[2:-2]
    rng.shuffle(middle)
    assert process_caption(CAPTION, cfg, random.Random(4)) == ", ".join(TAGS[:2] + middle + TAGS[-2:])


def test_keep_last_zero_and_short_captions():
    cfg = CaptionConfig(shuffle_tags=True, keep_tokens=0, keep_last=0)
    lasts = {process_caption(CAPTION, cfg, random.Random(s)).split(", ")[-1] for s in range(30)}
    assert len(lasts) > 2  # the tail moves when keep_last = 0
    cfg = CaptionConfig(shuffle_tags=True, keep_tokens=3, tag_dropout=1.0)
    assert process_caption("a, b", cfg, random.Random(0)) == "a, b"  # fewer tags than kept: nothing moves
    assert process_caption("a, b, c, d, e", cfg, random.Random(0)) == "a, b, c, d, e"  # 3 + 2 kept, none movable


def test_tag_dropout():
    everything = CaptionConfig(tag_dropout=1.0, keep_tokens=1)
    assert process_caption(CAPTION, everything, random.Random(0)) == ", ".join(TAGS[:1] + TAGS[-2:])
    half = CaptionConfig(tag_dropout=0.5)
    caption = ", ".join(f"t{i}" for i in range(2002))
    kept = process_caption(caption, half, random.Random(0)).split(", ")
    assert kept[-2:] == ["t2000", "t2001"]
    assert 900 < len(kept) - 2 < 1100  # binomial(2000, 0.5): mean 1000, sd 22
    assert kept == sorted(kept, key=lambda t: int(t[1:]))  # dropout alone keeps the order
    assert process_caption(caption, half, random.Random(5)) == process_caption(caption, half, random.Random(5))
    assert process_caption(caption, half, random.Random(5)) != process_caption(caption, half, random.Random(6))


def test_caption_dropout_returns_empty():
    assert process_caption(CAPTION, CaptionConfig(caption_dropout=1.0, prefix="sks"), random.Random(0)) == ""
    cfg = CaptionConfig(caption_dropout=0.3)
    rng = random.Random(0)
    outs = [process_caption(CAPTION, cfg, rng) for _ in range(2000)]
    dropped = sum(o == "" for o in outs)
    assert 500 < dropped < 700  # binomial(2000, 0.3): mean 600, sd 20
    assert all(o in ("", CAPTION) for o in outs)
    rng_a, rng_b = random.Random(9), random.Random(9)
    assert [process_caption(CAPTION, cfg, rng_a) for _ in range(50)] == \
           [process_caption(CAPTION, cfg, rng_b) for _ in range(50)]


def test_prefix_is_first_and_fixed():
    cfg = CaptionConfig(prefix="  sks  person ", shuffle_tags=True, tag_dropout=0.3)
    for seed in range(20):
        out = process_caption(CAPTION, cfg, random.Random(seed)).split(", ")
        assert out[0] == "sks person" and out[-2:] == TAGS[-2:]
    assert process_caption("", CaptionConfig(prefix="sks"), random.Random(0)) == "sks"


def test_config_validation_and_is_random():
    assert not CaptionConfig(keep_tokens=3, prefix="x").is_random
    assert CaptionConfig(shuffle_tags=True).is_random
    assert CaptionConfig(tag_dropout=0.1).is_random and CaptionConfig(caption_dropout=0.1).is_random
    with pytest.raises(ValueError):
        CaptionConfig(tag_dropout=1.5)
    with pytest.raises(ValueError):
        CaptionConfig(keep_tokens=-1)
