"""Calibration text sources: gensim's bundled Wikipedia pages by default (disjoint from the news sentences hf_vq's
fidelity evaluations use), a text file of any suffix, or a 🤗 Datasets name."""

from __future__ import annotations

import functools
import os

__all__ = ["wikipedia_sentences", "calibration_texts", "tokenize_batches", "load_dataset_any", "input_length"]

_WIKIPEDIA = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wikipedia_sentences(n: int | None = None, *, min_words: int = 6, max_words: int = 60, seed: int = 0) -> list[str]:
    """Real English sentences from the Wikipedia pages bundled with gensim (206 articles, offline), in a
    deterministic shuffled order: a calibration corpus disjoint from the news sentences fidelity is measured on.

    Raises:
        `ImportError`: if gensim is not installed (`pip install gensim`).
    """
    sentences = _wikipedia(min_words, max_words, seed)
    return list(sentences) if n is None else list(sentences[:n])


@functools.lru_cache(maxsize=4)
def _wikipedia(min_words: int, max_words: int, seed: int) -> tuple[str, ...]:
    import bz2
    import random
    import re

    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError as err:
        raise ImportError("The calibration corpus is gensim's bundled Wikipedia dump: `pip install gensim`.") from err
    sentences = []
    with bz2.BZ2File(datapath(_WIKIPEDIA)) as f:
        for _, text, _ in extract_pages(f):
            for para in filter_wiki(text).replace("\'\'", "").split("\n"):
                para = para.strip()
                if not para or para.startswith(("|", "{", "!", "*", "#", "=", ":", ";")):
                    continue
                for sentence in re.split(r"(?<=[.!?])\s+", para):
                    words = sentence.split()
                    if min_words <= len(words) <= max_words and sentence[-1:] in ".!?":
                        sentences.append(" ".join(words))
    random.Random(seed).shuffle(sentences)
    return tuple(sentences)


def calibration_texts(n: int, source: str | None = None) -> list[str]:
    """`n` calibration texts: from `source` — a text file of any suffix (one sample per non-blank line), or a
    🤗 Datasets name / local dataset folder (its `train` split's first text column) — or, by default, sentences of
    gensim's Wikipedia pages ([`wikipedia_sentences`]).

    Raises:
        `ValueError`: if `source` yields no text (naming it).
    """
    if source is None:
        texts = wikipedia_sentences(n)
    elif os.path.isfile(source):
        with open(source, encoding="utf-8", errors="replace") as f:
            if "\x00" in f.read(8192):
                raise ValueError(f"--calibration-data {source!r} is not a text file (it holds NUL bytes).")
            f.seek(0)
            texts = [line.strip() for line in f if line.strip()][:n]
    else:
        ds = load_dataset_any(source)["train"]
        column = next((c for c, feat in ds.features.items() if getattr(feat, "dtype", None) == "string"), None)
        if column is None:
            raise ValueError(f"--calibration-data {source!r}: the dataset has no text column (columns {ds.column_names}).")
        texts = [t for t in ds.select(range(min(n, len(ds))))[column] if t and t.strip()]
    if not texts:
        raise ValueError(f"calibration data {source!r} holds no text; give a file with one sample per line.")
    return texts


def input_length(model, max_length: int) -> int:
    """`max_length`, capped at the positions `model`'s config embeds (`max_position_embeddings`) when it has one."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(max_length, positions) if isinstance(positions, int) and positions > 0 else max_length


def tokenize_batches(tokenizer, texts: list[str], *, model=None, batch_size: int = 32, max_length: int = 128) -> list[dict]:
    """`texts` tokenized in padded batches (dicts of `[batch, seq]` tensors), truncated to `max_length` tokens and,
    when `model` is given, to the positions its config embeds (`max_position_embeddings`): a model trained on
    shorter inputs than `max_length` is never fed longer ones."""
    max_length = input_length(model, max_length)
    return [dict(tokenizer(texts[i: i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def load_dataset_any(name: str, config: str | None = None):
    """A 🤗 `DatasetDict`: a Hub id or a local dataset folder (loading script, data files), or a folder written by
    `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with `load_from_disk`; a single split becomes
    `train`)."""
    import datasets

    from pathlib import Path

    folder = Path(name)
    if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(folder))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    return datasets.load_dataset(name, config)
