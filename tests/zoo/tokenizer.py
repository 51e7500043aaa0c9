"""A small uncased WordPiece tokenizer for BERT-class vocabularies (vocab.txt, one token per line)."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    # ASCII symbols count as punctuation for BERT even where Unicode says otherwise ($, ^, `).
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPiece:
    def __init__(self, vocab_file: Path, max_chars_per_word: int = 100) -> None:
        tokens = Path(vocab_file).read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.max_chars = max_chars_per_word
        self.cls, self.sep, self.pad, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))

    def basic_split(self, text: str) -> list[str]:
        """Lowercase, strip accents, drop control characters, split on whitespace and punctuation (each
        punctuation mark a word of its own), CJK characters one per word."""
        text = unicodedata.normalize("NFD", text.lower())
        words: list[str] = []
        cur: list[str] = []

        def flush() -> None:
            if cur:
                words.append("".join(cur))
                cur.clear()

        for ch in text:
            cat = unicodedata.category(ch)
            if cat == "Mn" or ch == "\ufffd" or ord(ch) == 0 or (cat.startswith("C") and ch not in "\t\n\r"):
                continue
            if ch.isspace():
                flush()
            elif _is_punct(ch) or _is_cjk(ch):
                flush()
                words.append(ch)
            else:
                cur.append(ch)
        flush()
        return words

    def wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first split of one word; [UNK] when any part cannot be matched."""
        if len(word) > self.max_chars:
            return [self.unk]
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.unk]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        ids = [self.cls]
        for w in self.basic_split(text):
            ids.extend(self.wordpiece(w))
        ids.append(self.sep)
        return ids

    def batch(self, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids`` and ``attention_mask`` [len(texts), length] int64: truncated (keeping [SEP]) and
        padded with [PAD]."""
        ids = np.full((len(texts), length), self.pad, dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=np.int64)
        for i, t in enumerate(texts):
            e = self.encode(t)
            if len(e) > length:
                e = e[: length - 1] + [self.sep]
            ids[i, : len(e)] = e
            mask[i, : len(e)] = 1
        return ids, mask
