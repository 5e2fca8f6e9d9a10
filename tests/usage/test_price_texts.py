"""API nodes' price texts across ComfyUI versions: 0.3.64 reports dollars ("Price: 0.06$"),
later versions credits ("Price: 12.66 credits")."""

from __future__ import annotations

import pytest

from broker.usage.classify import price_in_progress_text
from broker.usage.pricing import credits_to_mc, usd_to_mc

CASES = [
    ("Price: 0.06$", ("0.06", False)),  # 0.3.64
    ("Price: $0.0400", ("0.0400", False)),
    ("Price: 12.66 credits", ("12.66", True)),
    ("Price: 1 credit", ("1", True)),
    ("Price: 12.66", ("12.66", True)),
    ("Status: polling\nPrice: 0.06$\nResult URL: https://x", ("0.06", False)),
    ("Result URL: https://example.com/a.png", None),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_price_texts_are_read_in_their_unit(text: str, expected: tuple[str, bool] | None) -> None:
    assert price_in_progress_text(text) == expected


def test_a_dollar_price_is_211_credits_per_dollar() -> None:
    found = price_in_progress_text("Price: 0.06$")
    assert found is not None
    amount, in_credits = found
    charged = credits_to_mc(amount) if in_credits else usd_to_mc(amount)
    assert charged == credits_to_mc("12.66")
