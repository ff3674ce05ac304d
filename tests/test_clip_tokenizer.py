"""IRRA tokenizer: IRRA's vocabulary on top of CLIP's BPE, official cleaning, truncation and padding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.clip_tokenizer import EOT_ID, MASK_ID, SOT_ID, IRRATokenizer, clean_text, irra_tokenizer

PREPROCESS_CASE = Path(__file__).parent / "parity" / "irra" / "preprocess" / "case.json"


@pytest.fixture(scope="module")
def tok() -> IRRATokenizer:
    return irra_tokenizer()


def test_vocabulary_is_clip_with_jekyll_replaced_by_mask(tok: IRRATokenizer) -> None:
    from open_clip.tokenizer import SimpleTokenizer  # CLIP's vocabulary from an independent implementation

    clip = SimpleTokenizer()
    assert tok.vocab_size == 49408
    assert (tok.encoder["<|mask|>"], tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]) == (
        MASK_ID, SOT_ID, EOT_ID)
    assert clip.decoder[49405] == "jekyll</w>" and "jekyll</w>" not in tok.encoder
    ours = {token: i for token, i in tok.encoder.items() if i < MASK_ID}
    theirs = {token: i for token, i in clip.encoder.items() if i < MASK_ID}
    assert ours == theirs


def test_official_ids_of_the_fixture_captions(tok: IRRATokenizer) -> None:
    case = json.loads(PREPROCESS_CASE.read_text())
    ids = tok(case["inputs"]["text"]["value"])
    assert ids.dtype == np.int64 and ids.shape == (4, 77)
    assert ids.tolist() == case["outputs"]["input_ids"]["value"]


def test_truncation_forces_eot_in_the_last_slot(tok: IRRATokenizer) -> None:
    caption = " ".join(["red"] * 100)
    full = tok.encode(caption)
    assert len(full) == 100
    row = tok.tokenize(caption)
    assert row[0] == SOT_ID and row[76] == EOT_ID and (row != 0).all()
    assert row[1:76].tolist() == full[:75]  # only the first 75 BPE tokens survive
    assert row.argmax() == 76


def test_padding_and_eot_position(tok: IRRATokenizer) -> None:
    row = tok.tokenize("a man in a red shirt")
    n = len(tok.encode("a man in a red shirt"))
    assert row[0] == SOT_ID and row[n + 1] == EOT_ID and not row[n + 2:].any()
    assert row.argmax() == n + 1
    empty = tok.tokenize("")
    assert empty[:2].tolist() == [SOT_ID, EOT_ID] and not empty[2:].any()


def test_cleaning_html_twice_whitespace_and_case() -> None:
    assert clean_text("  A MAN &amp;amp; a   Dog\n") == "a man & a dog"
    assert clean_text("caf\u00c3\u00a9") == "café"  # ftfy repairs mojibake


def test_tokens_digits_and_mask_special(tok: IRRATokenizer) -> None:
    assert tok.encode("2023") == tok.encode("2 0 2 3") and len(tok.encode("2023")) == 4
    ids = tok.encode("a <|mask|> shirt")
    assert ids[1] == MASK_ID and ids[0] == tok.encode("a")[0] and ids[2] == tok.encode("shirt")[0]
    assert tok.encode("A Woman's BAG") == tok.encode("a woman's bag")
    assert tok.decode(tok.encode("a woman with a red bag")) == "a woman with a red bag "


def test_word_without_id_in_irra_vocab_does_not_crash(tok: IRRATokenizer) -> None:
    # the official tokenizer raises KeyError here; we stop before the merge whose token was dropped
    ids = tok.encode("jekyll")
    assert len(ids) == 2 and all(i < MASK_ID for i in ids)
    assert tok.decode(ids) == "jekyll "
    assert tok(["jekyll and hyde"]).shape == (1, 77)


def test_batch_shapes(tok: IRRATokenizer) -> None:
    assert tok([]).shape == (0, 77)
    assert tok("one").shape == (1, 77)
