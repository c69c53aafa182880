"""CLIP prompt tokenization with the `tokenizers` library: fixed 77-token windows, truncation reported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass(frozen=True)
class Tokenized:
    ids: np.ndarray
    """int64 [max_length]: start token, kept tokens, end token, padding."""
    kept_tokens: int
    dropped_tokens: int
    dropped_text: str


class PromptTokenizer:
    def __init__(self, path: Path, max_length: int, bos_id: int, eos_id: int, pad_id: int,
                 embeddings: dict[str, list[str]] | None = None):
        """`embeddings`: textual-inversion tokens as prompts write them -> the tokens they stand for (the
        manifest's `tokenizer.embeddings`): a multi-vector token expands to one token per vector, as diffusers'
        `maybe_convert_prompt` does."""
        self._tok = Tokenizer.from_file(str(path))
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.embedding_tokens = list(embeddings or {})
        self._expand: dict[int, list[int]] = {}
        for token, parts in (embeddings or {}).items():
            found = [self._tok.token_to_id(t) for t in parts]
            ids = [i for i in found if i is not None]
            if len(ids) != len(found) or not ids or ids[0] != self._tok.token_to_id(token):
                raise ValueError(f"{path}: textual-inversion token {token!r} expands to {parts}, which "
                                 f"{path.name} does not hold as added tokens (ids {found})")
            if len(ids) > 1:
                self._expand[ids[0]] = ids

    def __call__(self, text: str) -> Tokenized:
        tokens = self._tok.encode(text, add_special_tokens=False).ids
        if self._expand:  # token -> token token_1 ... token_{n-1}; by id, so the token matches in any case
            tokens = [j for i in tokens for j in self._expand.get(i, (i,))]
        room = self.max_length - 2
        kept, dropped = tokens[:room], tokens[room:]
        ids = [self.bos_id, *kept, self.eos_id]
        ids += [self.pad_id] * (self.max_length - len(ids))
        return Tokenized(
            ids=np.asarray(ids, dtype=np.int64),
            kept_tokens=len(kept),
            dropped_tokens=len(dropped),
            dropped_text=self.decode(dropped),
        )

    def decode(self, ids: list[int]) -> str:
        # CLIP marks word ends with "</w>"; the saved fast tokenizer's byte-level decoder keeps it.
        return self._tok.decode(ids).replace("</w>", " ").strip()
