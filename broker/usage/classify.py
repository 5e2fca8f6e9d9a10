"""What an API node's failure means, from ComfyUI's `execution_error.exception_message`.

ComfyUI turns comfy.org's HTTP answers into fixed messages (`"{message}\\n{tips}"`,
so they are matched by prefix or substring, as ComfyUI's own frontend does).
"""

from __future__ import annotations

import re

# "Price: 12.66 credits" (current), "Price: 0.06$" (0.3.64) or "Price: $0.06"; a number
# without a unit is credits, as current versions report.
PRICE_TEXT = re.compile(
    r"Price:\s*(?P<before>\$)?\s*(?P<amount>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>\$|credits?)?",
    re.IGNORECASE,
)

ERROR_CLASSES = (
    ("insufficient_credits", ("payment required", "insufficient credits", "insufficientfunds")),
    ("invalid_key", ("unauthorized: please login", "invalid api key", "unauthorized")),
    ("account_problem", ("problem with your account",)),
    ("rate_limited", ("rate limit exceeded",)),
    ("validation", ("failed validation", "value not in list", "required input is missing")),
    ("provider_error", ("api error", "task failed", "content filtered", "moderat")),
)
# What the classes mean as HTTP statuses, for reports.
ERROR_STATUS = {
    "insufficient_credits": 402,
    "invalid_key": 401,
    "account_problem": 409,
    "rate_limited": 429,
}


def classify_execution_error(message: str | None) -> str:
    text = (message or "").lower()
    for error_class, needles in ERROR_CLASSES:
        if any(needle in text for needle in needles):
            return error_class
    return "execution_error"


def price_in_progress_text(text: str) -> tuple[str, bool] | None:
    """The amount in an API node's price text, and whether it is in credits (else USD)."""
    match = PRICE_TEXT.search(text)
    if match is None:
        return None
    in_dollars = match["before"] == "$" or match["unit"] == "$"
    return match["amount"], not in_dollars
