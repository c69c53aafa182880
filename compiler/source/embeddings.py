"""Textual-inversion embeddings: each file is read safely, checked against the text encoder and tokenizer, and
added with diffusers' own loader (`load_textual_inversion`), which adds the tokens and the embedding rows.

Formats (what diffusers' loader reads): AUTOMATIC1111 `.pt` (`string_to_param`) and `.safetensors`
(`emb_params`), diffusers `learned_embeds.safetensors` / `.bin` (one key: the token). A file of n vectors adds the
tokens `TOKEN`, `TOKEN_1` ... `TOKEN_{n-1}`; prompts write `TOKEN` alone and the runtime expands it (the manifest's
`tokenizer.embeddings` records each expansion). Pickles (`.pt`, `.bin`) are read only through PyTorch's
`weights_only` loader, as diffusers does: a pickle holding anything but tensors and plain data is refused.

SDXL models take SDXL embeddings: `clip_l` and `clip_g` tensors (the same number of vectors for each of its two
text encoders), added with the same loader to each tokenizer and text encoder; the manifest records the second
tokenizer's ids too (`token_ids_2`).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.source.errors import SourceError
from compiler.source.options import EmbeddingSpec
from model_store import sha256_file

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".bin")
A1111_PT, A1111_SAFETENSORS, DIFFUSERS = "automatic1111-pt", "automatic1111-safetensors", "diffusers"
SDXL = "sdxl"
"""An SDXL embedding: `clip_l` (the first text encoder's vectors) and `clip_g` (the second's)."""


@dataclass(frozen=True)
class Embedding:
    """One embedding file, read and checked, ready for diffusers' loader."""

    spec: EmbeddingSpec
    state: Any
    """What the file holds, as diffusers' loader takes it (a dict of tensors, or a bare tensor)."""
    format: str
    """`automatic1111-pt`, `automatic1111-safetensors` or `diffusers`."""
    token: str
    """The token prompts write."""
    tokens: list[str]
    """The tokens added, one per vector: `token`, `token_1`, ..."""

    @property
    def path(self) -> Path:
        return Path(self.spec.path)


def add(pipe: Any, specs: list[EmbeddingSpec]) -> list[dict[str, Any]]:
    """Add every embedding in `specs` to `pipe`'s tokenizer and text encoder; provenance for the manifest, one
    dict per file. All files are read and checked before the pipeline changes; SourceError names the file and
    what does not fit (unreadable, not weights, another text encoder's width, a token the tokenizer has)."""
    width = int(pipe.text_encoder.get_input_embeddings().weight.shape[1])
    second = getattr(pipe, "text_encoder_2", None)
    width_2 = int(second.get_input_embeddings().weight.shape[1]) if second is not None else None
    vocab = set(pipe.tokenizer.get_vocab())
    taken: dict[str, Path] = {}
    read = []
    for spec in specs:
        emb = _read(spec, width, vocab, width_2)
        for t in emb.tokens:
            if t.lower() in taken:
                raise SourceError(f"embedding {emb.path}: token {t!r} is also added by {taken[t.lower()]}; "
                                  f"give one of them another token ({emb.path}:TOKEN)")
            taken[t.lower()] = emb.path
        read.append(emb)
    info = []
    for emb in read:
        if emb.format == SDXL:
            pipe.load_textual_inversion(emb.state["clip_l"], token=emb.token, tokenizer=pipe.tokenizer,
                                        text_encoder=pipe.text_encoder)
            pipe.load_textual_inversion(emb.state["clip_g"], token=emb.token, tokenizer=pipe.tokenizer_2,
                                        text_encoder=pipe.text_encoder_2)
        else:
            pipe.load_textual_inversion(emb.state, token=emb.token, tokenizer=pipe.tokenizer,
                                        text_encoder=pipe.text_encoder)
        ids = [pipe.tokenizer.convert_tokens_to_ids(t) for t in emb.tokens]
        info.append({
            "file": emb.path.name, "path": str(emb.path.resolve()), "sha256": sha256_file(emb.path),
            "format": emb.format, "token": emb.token, "vectors": len(emb.tokens), "tokens": emb.tokens,
            "token_ids": ids,
            **({"token_ids_2": [pipe.tokenizer_2.convert_tokens_to_ids(t) for t in emb.tokens]}
               if emb.format == SDXL else {}),
        })
    return info


def tokenizer_section(tokenizer_json: Path, embeddings: list[dict[str, Any]],
                      ids: str = "token_ids") -> list[dict[str, Any]]:
    """The manifest's `tokenizer.embeddings`, in the order they were added: each token prompts write and the
    tokens it stands for (`{"token": "tok", "tokens": ["tok", "tok_1"]}`), after checking that the bundle's
    `tokenizer.json` encodes every added token as the id its row was written at (`ids`: `token_ids_2` for
    SDXL's second tokenizer)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    for e in embeddings:
        for t, want in zip(e["tokens"], e[ids], strict=True):
            got = tok.encode(t, add_special_tokens=False).ids
            if got != [want]:
                raise SourceError(f"embedding {e['file']}: {tokenizer_json} encodes token {t!r} as {got}, not as "
                                  f"the id its embedding row was written at ({want})")
    return [{"token": e["token"], "tokens": list(e["tokens"])} for e in embeddings]


def _read(spec: EmbeddingSpec, width: int, vocab: set[str], width_2: int | None = None) -> Embedding:
    """`width_2`: an SDXL model's second text encoder's width (None: the model has one text encoder)."""
    path = Path(spec.path)
    state = _load(path)
    if width_2 is not None or _is_sdxl_embedding(state):
        state = _check_sdxl(path, state, width, width_2)
        fmt, own_token, vectors = SDXL, None, state["clip_l"]
    else:
        fmt, own_token, vectors = _identify(path, state)
    token = spec.token or own_token or path.stem
    vectors = _check_vectors(path, vectors, width)
    _check_token(path, token, vocab)
    n = 1 if vectors.dim() == 1 else int(vectors.shape[0])
    tokens = [token] + [f"{token}_{i}" for i in range(1, n)]
    for i, t in enumerate(tokens[1:], start=2):
        if t.lower() in vocab:
            raise SourceError(f"embedding {path}: token {t!r} (vector {i} of {n} for {token!r}) is already in the "
                              f"tokenizer's vocabulary; give another token ({path}:TOKEN)")
    return Embedding(spec, state, fmt, token, tokens)


def _load(path: Path) -> Any:
    """The file's tensors: safetensors through safetensors, pickles through PyTorch's weights_only loader."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error type for every malformed file
            raise SourceError(f"embedding {path}: not a readable safetensors file (truncated or not "
                              f"safetensors): {e}") from None
    if suffix in PICKLE_SUFFIXES:
        import torch

        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            reason = _unpickler_reason(str(e))
            if "global" in reason.lower():  # the pickle calls or builds something: code, not weights
                raise SourceError(f"embedding {path}: a pickle that is not plain weights; PyTorch's weights_only "
                                  f"loader refused it ({reason}). Only tensors and plain data are read from "
                                  ".pt/.bin files; convert the embedding to .safetensors") from None
            raise SourceError(f"embedding {path}: not a readable PyTorch file (truncated or not a torch.save "
                              f"file): {reason}") from None
        except Exception as e:  # torch raises RuntimeError/EOFError/... for truncated or foreign bytes
            text = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"embedding {path}: not a readable PyTorch file (truncated or not a "
                              f"torch.save file): {text}") from None
    raise SourceError(f"embedding {path}: unknown file type {path.suffix!r}; textual-inversion embeddings are "
                      f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)} files")


def _unpickler_reason(message: str) -> str:
    """The line of PyTorch's weights_only refusal that says what it met (its other lines are boilerplate)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file an issue",
                                                     "Check the documentation"))]
    return (keep or lines or ["unpickling failed"])[0]


def _is_sdxl_embedding(state: Any) -> bool:
    return isinstance(state, dict) and bool({"clip_l", "clip_g"} & set(map(str, state)))


def _check_sdxl(path: Path, state: Any, width: int, width_2: int | None) -> dict[str, Any]:
    """An SDXL model takes SDXL embeddings only (and an SDXL embedding needs an SDXL model): `clip_l` and
    `clip_g` with the same number of vectors, each as wide as its text encoder's token embeddings."""
    if width_2 is None:
        raise SourceError(f"embedding {path}: keys {sorted(map(str, state))[:6]} are an SDXL embedding (clip_l/clip_g, "
                          "for two text encoders); this model has one (SD 1.x/2.x embeddings hold string_to_param, "
                          "emb_params or one token key)")
    if not _is_sdxl_embedding(state) or not {"clip_l", "clip_g"} <= set(map(str, state)):
        keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise SourceError(f"embedding {path}: an SDXL model takes SDXL embeddings (clip_l and clip_g tensors, one "
                          f"set of vectors per text encoder); this file holds {keys}: an embedding for SD 1.x/2.x "
                          "or an incomplete one")
    clip_l = _check_vectors(path, state["clip_l"], width)
    clip_g = _check_vectors(path, state["clip_g"], width_2)
    if clip_l.reshape(-1, width).shape[0] != clip_g.reshape(-1, width_2).shape[0]:
        raise SourceError(f"embedding {path}: clip_l has {clip_l.reshape(-1, width).shape[0]} vectors, clip_g "
                          f"{clip_g.reshape(-1, width_2).shape[0]}; an SDXL embedding has as many for each encoder")
    return {"clip_l": clip_l, "clip_g": clip_g}


def _identify(path: Path, state: Any) -> tuple[str, str | None, Any]:
    """(format, the file's own token or None, the vectors) for the layouts diffusers' loader reads."""
    import torch

    if isinstance(state, torch.Tensor):
        return DIFFUSERS, None, state
    if not isinstance(state, dict):
        raise SourceError(f"embedding {path}: holds a {type(state).__name__}, not a textual-inversion embedding")
    if "string_to_param" in state:
        params = state["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise SourceError(f"embedding {path}: AUTOMATIC1111 layout but string_to_param has no '*' tensor "
                              f"(keys: {sorted(params) if isinstance(params, dict) else type(params).__name__})")
        # AUTOMATIC1111 names an embedding after its file (its `name` field is not what prompts write)
        return A1111_PT, None, params["*"]
    if len(state) == 1:
        key, value = next(iter(state.items()))
        if key == "emb_params":
            return A1111_SAFETENSORS, None, value
        return DIFFUSERS, str(key), value
    keys = sorted(map(str, state))
    hint = ""
    if {"clip_l", "clip_g"} & set(keys):
        hint = " (clip_l/clip_g: an SDXL embedding, for two text encoders; this model has one)"
    raise SourceError(f"embedding {path}: keys {keys[:6]}{'...' if len(keys) > 6 else ''} are not a "
                      "textual-inversion layout Kiln reads: string_to_param (AUTOMATIC1111 .pt), emb_params "
                      f"(AUTOMATIC1111 .safetensors) or a single token key (diffusers learned_embeds){hint}")


def _check_vectors(path: Path, vectors: Any, width: int) -> Any:
    import torch

    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        kind = vectors.dtype if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise SourceError(f"embedding {path}: the vectors are {kind}, not floating-point tensors")
    if vectors.dim() not in (1, 2) or vectors.shape[-1] != width or vectors.numel() == 0:
        raise SourceError(f"embedding {path}: vectors of shape {list(vectors.shape)} do not fit this text "
                          f"encoder, whose token embeddings are {width} wide (expected [{width}] or [N, {width}]); "
                          "the embedding was trained for another model architecture")
    if not torch.isfinite(vectors).all():
        raise SourceError(f"embedding {path}: the vectors hold NaN or infinite values")
    return vectors


def _check_token(path: Path, token: str, vocab: set[str]) -> None:
    if not token or any(c.isspace() for c in token):
        raise SourceError(f"embedding {path}: token {token!r} must be one word without spaces ({path}:TOKEN)")
    # CLIP's vocabulary marks a word's end with </w>: "cat" is the word "cat</w>"; as an added token it would
    # take the word's place in every prompt
    clash = next((v for v in (token, token.lower(), f"{token.lower()}</w>") if v in vocab), None)
    if clash is not None:
        example = f", e.g. <{token}>" if not token.startswith("<") else ""
        raise SourceError(f"embedding {path}: token {token!r} is already in the tokenizer's vocabulary (as "
                          f"{clash!r}); give the embedding a token of its own ({path}:TOKEN{example})")
