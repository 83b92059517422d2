"""Text for image-text models (SimSeg): the BERT vocabulary, its WordPiece tokeniser and SimSeg's caption
augmentation (specs/simseg.md §1.1, §1.5).

Tokenisation is bert-base-uncased's (lower-cased WordPiece), run by the `tokenizers` library (what transformers'
fast BertTokenizer runs), padded and truncated to `max_length` (25) with [CLS] ... [SEP]. Special tokens written
in a text ("[MASK]") are read as those tokens, as transformers' tokenizer does.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from semiseg_cli.errors import UserError

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_vocab(path: str | Path) -> bytes:
    """The bytes of a BERT vocab.txt (`path` is the file or a tokenizer folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "vocab.txt"
    if not p.is_file():
        raise UserError(f"{path}: no BERT vocabulary (a vocab.txt file, or the bert-base-uncased tokenizer folder "
                        "holding one)")
    data = p.read_bytes()
    lines = data.decode("utf-8", errors="replace").splitlines()
    missing = [t for t in SPECIAL if t not in lines]
    if missing:
        raise UserError(f"{p}: not a BERT vocabulary (no {', '.join(missing)} token)")
    return data


def token_count(vocab: bytes) -> int:
    """The number of tokens (lines) of a vocab.txt's bytes."""
    return len(vocab.decode("utf-8").splitlines())


class Tokenizer:
    """BERT WordPiece tokenisation (lower-cased, bert-base-uncased's) padded and truncated to `max_length`."""

    def __init__(self, vocab: bytes, max_length: int = 25):
        try:
            from tokenizers import BertWordPieceTokenizer
        except ImportError:
            raise UserError("SimSeg's text tower needs the `tokenizers` package: pip install 'semiseg[simseg]'") from None

        self.words = vocab.decode("utf-8").splitlines()
        self.vocab = {w: i for i, w in enumerate(self.words)}
        self.tok = BertWordPieceTokenizer(self.vocab, lowercase=True)
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(length=max_length, pad_id=self.vocab["[PAD]"], pad_token="[PAD]")
        self.raw = BertWordPieceTokenizer(self.vocab, lowercase=True)  # unpadded, untruncated: `pieces`

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each [N, max_length] long."""
        enc = self.tok.encode_batch(list(texts))
        return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])

    def pieces(self, text: str) -> list[str]:
        """The word pieces of `text`, without [CLS] / [SEP] and untruncated (BertTokenizer.tokenize)."""
        return self.raw.encode(text, add_special_tokens=False).tokens


def augment_caption(text: str, tok: Tokenizer, rng: random.Random, p: float = 0.2) -> str:
    """SimSeg's `process_caption` (training only): each word piece is selected with probability p; a selected
    piece becomes [MASK] (half of them), a random vocabulary token (a tenth) or is deleted (the rest: 10 %
    [MASK], 2 % random, 8 % deleted at p 0.2; its comment says "keep", its code deletes). The pieces are then
    re-joined into words (a word's ## pieces appended to it; pieces whose word was masked or replaced are
    dropped) for re-tokenising.

    SimSeg re-joins at most two ## pieces per word and drops the rest of a longer word; here a word keeps all
    of its pieces (a tokenisation detail, not part of the augmentation)."""
    if p <= 0:
        return text
    out = []
    for piece in tok.pieces(text):
        draw = rng.random()
        if draw < p:
            draw /= p
            if draw < 0.5:
                out.append("[MASK]")
            elif draw < 0.6:
                out.append(tok.words[rng.randrange(len(tok.words))])
            # else deleted
        else:
            out.append(piece)
    words = []
    for i, piece in enumerate(out):
        if piece.startswith("##"):
            if words and words[-1][1] == i - 1 and words[-1][0] != "[MASK]":
                words[-1] = (words[-1][0] + piece[2:], i)  # glued to the word before (its last piece)
            continue  # an orphan piece (its word masked, deleted or replaced): dropped, as SimSeg does
        words.append((piece, i))
    return " ".join(w for w, _ in words)
