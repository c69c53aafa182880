"""Tiers file, request cost and API keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.accounts import keys
from runtime.accounts.cost import request_cost
from runtime.accounts.tiers import DEFAULT_TIERS, load_tiers


def test_default_tiers_file() -> None:
    tiers = load_tiers(DEFAULT_TIERS)
    assert set(tiers) == {"free", "pro", "admin"}
    free = tiers["free"]
    assert free.daily_credits == 50 and free.max_pixels == 512 * 512 and not free.admin and free.allows_model("x")
    assert tiers["admin"].admin


@pytest.mark.parametrize(("body", "message"), [
    ("", "no \\[tiers.NAME\\] tables"),
    ("[tiers.a]\ndaily_credits = 1\n", "tier 'a': missing field\\(s\\) requests_per_minute"),
    ("[tiers.a]\ndaily_credits = 1\nrequests_per_minute = 0\nmax_concurrent = 1\nmax_steps = 1\nmax_pixels = 1\n"
     "max_images = 1\nmodels = ['*']\n", "requests_per_minute=0 must be an integer of at least 1"),
    ("[tiers.a]\ndaily_credits = 1\nrequests_per_minute = 1\nmax_concurrent = 1\nmax_steps = 1\nmax_pixels = 1\n"
     "max_images = 1\nmodels = []\n", "models=\\[\\] must be a non-empty list"),
    ("[tiers.a]\ncolour = 'red'\n", "unknown field\\(s\\) colour"),
    ("[tiers.a\n", "tiers file .*: "),
])
def test_bad_tiers_files_name_the_problem(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_tiers(path)


def test_only_listed_models_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text("[tiers.t]\ndaily_credits = 0\nrequests_per_minute = 1\nmax_concurrent = 1\nmax_steps = 1\n"
                    "max_pixels = 1\nmax_images = 1\nmodels = ['shapes']\n")
    t = load_tiers(path)["t"]
    assert t.allows_model("shapes") and not t.allows_model("sd-v1") and t.daily_credits == 0


@pytest.mark.parametrize(("w", "h", "steps", "images", "cost"), [
    (512, 512, 10, 1, 1), (64, 64, 1, 1, 1), (512, 512, 11, 1, 2), (513, 512, 4, 1, 2), (768, 768, 20, 1, 6),
    (1024, 1024, 30, 2, 24), (256, 256, 30, 2, 6),
])
def test_cost(w: int, h: int, steps: int, images: int, cost: int) -> None:
    assert request_cost(w, h, steps, images) == cost


def test_cost_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="steps=0 must be at least 1"):
        request_cost(512, 512, 0)


def test_keys_are_random_parse_and_match_only_their_own_hash() -> None:
    a, b = keys.new_key(), keys.new_key()
    assert a.token != b.token and a.key_id != b.key_id
    key_id, secret = keys.parse(a.token) or ("", "")
    assert key_id == a.key_id and keys.matches(secret, a.secret_hash) and not keys.matches(secret, b.secret_hash)
    assert secret not in a.secret_hash
    for bad in ("", "kiln_", a.token + "x", a.token.replace("kiln_", "klin_"), "Bearer " + a.token):
        assert keys.parse(bad) is None
