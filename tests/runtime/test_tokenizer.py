"""The runtime's `tokenizers`-based CLIP tokenization equals transformers' CLIPTokenizer, and reports truncation."""

from __future__ import annotations

from pathlib import Path

import pytest

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "  Hello,   WORLD!! café naïve 日本語 emoji 🎨 don't  it's ",
    "a red circle\non a blue background\t, 4k, (masterpiece:1.2)",
    "word " * 100,
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_transformers(tiny_model, tiny_source: Path, prompt: str) -> None:  # type: ignore[no-untyped-def]
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(tiny_source / "tokenizer")
    expected = ref(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert tiny_model.tokenizer(prompt).ids.tolist() == expected


def test_truncation_is_reported_with_the_dropped_text(tiny_model) -> None:  # type: ignore[no-untyped-def]
    t = tiny_model.tokenizer("cat " * 75 + "on a red mat")  # one token per word: 79 tokens
    assert (t.kept_tokens, t.dropped_tokens) == (75, 4)
    assert t.dropped_text == "on a red mat"
    assert t.ids[0] == 49406 and t.ids[76] == 49407
    short = tiny_model.tokenizer("a cat")
    assert (short.kept_tokens, short.dropped_tokens, short.dropped_text) == (2, 0, "")
