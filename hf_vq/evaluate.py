"""Fidelity of a compressed model to its dense original, on real inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["real_sentences", "mean_pool", "embedding_cosine"]


def real_sentences(n: int = 256, *, min_words: int = 6) -> list[str]:
    """`n` real English sentences from the Lee news corpus that ships with gensim (offline).

    Raises:
        `ImportError`: if gensim is not installed (`pip install gensim`).
    """
    try:
        from gensim.test.utils import datapath
    except ImportError as err:
        raise ImportError("Real test sentences come from gensim's bundled corpora: `pip install gensim`.") from err
    sentences: list[str] = []
    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        for doc in f:
            for sentence in doc.replace("?", ".").replace("!", ".").split(". "):
                sentence = sentence.strip()
                if len(sentence.split()) >= min_words:
                    sentences.append(sentence if sentence.endswith(".") else sentence + ".")
                if len(sentences) >= n:
                    return sentences
    return sentences


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings `[batch, hidden]`: mean of `last_hidden_state [batch, seq, hidden]` over the mask."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # [batch, seq, 1]
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


@torch.no_grad()
def embedding_cosine(dense: nn.Module, compressed: nn.Module, tokenizer, sentences: list[str], *,
                     batch_size: int = 32) -> dict[str, float]:
    """Cosine similarity of mean-pooled sentence embeddings, compressed vs dense (mean, min)."""
    cosines = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[i: i + batch_size], padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
        a = mean_pool(dense(**batch).last_hidden_state, batch["attention_mask"])
        b = mean_pool(compressed(**batch).last_hidden_state, batch["attention_mask"])
        cosines.append(F.cosine_similarity(a.float(), b.float(), dim=-1))
    cos = torch.cat(cosines)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "n_sentences": len(sentences)}
