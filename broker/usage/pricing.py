"""Estimate a prompt's credits before it is forwarded.

Each API node's `/object_info` entry carries a `price_badge`: a JSONata
expression that ComfyUI's frontend evaluates against the node's widget values
to show its price. The broker evaluates the same expression on the prompt's
actual inputs, with the frontend's rules (see ../shared/design/CREDITS.md):

    context = {"widgets": {name: value}, "inputs": {name: {"connected": bool}},
               "inputGroups": {group: connected count}}

Widget values are coerced as ComfyUI's validation does (`"100"` is the INT 100,
held to the declared min/max); combo and string values are trimmed and lowercased.
A widget fed by a link has no literal value: the node is priced over every value
the link may carry (both ends of the declared range, each choice), and is unpriced
when that range is open. A price past MAX_PRICE_USD is no price (unpriced). Results are USD: `usd`,
`range_usd`, `list_usd` (pick one: min..max) or `text` (unpriced); a suffix may
carry a multiplier (" x 4/Run") or a per-second rate with unknown duration
(priced at the longest duration). Credits = USD x 211. Amounts are integer
milli-credits, so sums are exact.

Nodes without a usable badge fall back to the operator's price table
(`BROKER_PRICE_TABLE`), else they are unpriced and the tenant's policy decides.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import jsonata

log = logging.getLogger("broker.pricing")

CREDITS_PER_USD = Decimal(211)
MC_PER_CREDIT = 1000
LONGEST_SECONDS = 20  # a per-second price with an unknown duration is reserved for this long
MULTIPLIER = re.compile(r"[x×]\s*(\d+)")
# JSONata's functions whose result is not the context's alone: such a badge is not remembered.
IMPURE = re.compile(r"\$(?:now|millis|random|eval)\b")  # $eval: could call them
MAX_REMEMBERED = 4096  # badge results (expression, context); all forgotten when full
MAX_REMEMBERED_CONTEXT = 1024  # characters of a context's repr (a long text widget: not kept)


@dataclass(frozen=True)
class NodePrice:
    node_id: str
    class_type: str
    min_mc: int
    max_mc: int
    source: str  # "badge" or "table"

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "class_type": self.class_type,
            "min_mc": self.min_mc,
            "max_mc": self.max_mc,
            "source": self.source,
        }


@dataclass(frozen=True)
class Estimate:
    nodes: list[NodePrice] = field(default_factory=list)
    unpriced: list[str] = field(default_factory=list)  # node ids

    @property
    def min_mc(self) -> int:
        return sum(node.min_mc for node in self.nodes)

    @property
    def max_mc(self) -> int:
        return sum(node.max_mc for node in self.nodes)


def usd_to_mc(usd: Any) -> int:
    amount = Decimal(str(usd)) * CREDITS_PER_USD * MC_PER_CREDIT
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def credits_to_mc(credits: Any) -> int:
    amount = Decimal(str(credits)) * MC_PER_CREDIT
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def mc_to_credits(mc: int) -> Decimal:
    return (Decimal(mc) / MC_PER_CREDIT).quantize(Decimal("0.001"))


class Pricer:
    """Evaluates price badges (compiled once per expression) and the price table."""

    def __init__(self, price_table: dict[str, tuple[int, int]]) -> None:
        self._table = price_table
        self._compiled: dict[str, jsonata.Jsonata] = {}
        self._results: dict[tuple[str, str], tuple[int, int] | None] = {}

    def estimate(
        self, graph: dict[str, Any], nodes_info: dict[str, Any], key_nodes: list[str]
    ) -> Estimate:
        """Prices for the nodes of `graph` whose class is one of `key_nodes`."""
        priced: list[NodePrice] = []
        unpriced: list[str] = []
        for node_id, node in graph.items():
            class_type = node["class_type"]
            if class_type not in key_nodes:
                continue
            price = self._node_price(node_id, node, nodes_info.get(class_type))
            if price is None:
                unpriced.append(node_id)
            else:
                priced.append(price)
        return Estimate(priced, unpriced)

    def _node_price(self, node_id: str, node: dict[str, Any], info: Any) -> NodePrice | None:
        class_type = node["class_type"]
        badge = info.get("price_badge") if isinstance(info, dict) else None
        bounds = self._badge_bounds(badge, node, info) if isinstance(badge, dict) else None
        if bounds is not None:
            return NodePrice(node_id, class_type, *bounds, source="badge")
        if class_type in self._table:
            return NodePrice(node_id, class_type, *self._table[class_type], source="table")
        return None

    def _badge_bounds(
        self, badge: dict[str, Any], node: dict[str, Any], info: dict[str, Any]
    ) -> tuple[int, int] | None:
        """The lowest and highest price over every context the node may run under."""
        expression = badge.get("expr")
        if badge.get("engine", "jsonata") != "jsonata" or not isinstance(expression, str):
            return None
        contexts = badge_contexts(badge.get("depends_on") or {}, node.get("inputs") or {}, info)
        if contexts is None:
            return None
        lows, highs = [], []
        for context in contexts:
            bounds = self._evaluate(expression, context, node["class_type"])
            if bounds is None:
                return None
            lows.append(bounds[0])
            highs.append(bounds[1])
        return min(lows), max(highs)

    def _evaluate(
        self, expression: str, context: dict[str, Any], class_type: str
    ) -> tuple[int, int] | None:
        # Remembered: the same node's badge is evaluated again on nearly every prompt, and
        # JSONata's interpreter was ~5 % of a small prompt's CPU. repr tells True, 1 and
        # 1.0 apart, and keeps the keys' order (which JSONata sees).
        key = (expression, repr(context))
        if key in self._results:
            return self._results[key]
        try:
            result = self._compile(expression).evaluate(context)
        except Exception as exc:  # noqa: BLE001  a broken badge only makes the node unpriced
            log.warning(
                "pricing.badge_failed class_type=%s error=%s", class_type, type(exc).__name__
            )
            return None
        bounds = result_bounds(result)
        if len(key[1]) <= MAX_REMEMBERED_CONTEXT and not IMPURE.search(expression):
            if len(self._results) >= MAX_REMEMBERED:
                self._results.clear()
            self._results[key] = bounds
        return bounds

    def _compile(self, expression: str) -> jsonata.Jsonata:
        compiled = self._compiled.get(expression)
        if compiled is None:
            compiled = self._compiled[expression] = jsonata.Jsonata(expression)
        return compiled


def badge_contexts(
    depends_on: dict[str, Any], inputs: dict[str, Any], info: Any
) -> list[dict[str, Any]] | None:
    """The contexts to price the node under: one for literal widget values (coerced as
    ComfyUI's validation does), and, for widgets fed by a link, one per combination of
    the values the link may carry (the ends of the declared range, every choice).
    None when that cannot be known: a value ComfyUI would refuse, or a link into a
    widget whose range is open or too large to enumerate."""
    spec = info if isinstance(info, dict) else {}
    candidates: dict[str, list[Any]] = {}
    for widget in depends_on.get("widgets") or []:
        name, kind = _widget(widget)
        value = inputs.get(name)
        declared = _declared(spec, name)
        if _is_link(value):
            values = link_values(declared, kind)
        else:
            literal = _default(spec, name) if value is None else value
            values = [coerce(literal, declared, kind)]
        if values is None or any(v is INVALID for v in values):
            return None
        candidates[name] = [_normalize(v, kind) for v in values]
    combinations: list[dict[str, Any]] = [{}]
    for name, values in candidates.items():
        combinations = [{**known, name: value} for known in combinations for value in values]
        if len(combinations) > MAX_COMBINATIONS:
            return None
    connected = {
        name: {"connected": _is_link(inputs.get(name))} for name in depends_on.get("inputs") or []
    }
    groups = {
        group: sum(1 for key, value in inputs.items()
                   if key.startswith(f"{group}.") and _is_link(value))
        for group in depends_on.get("input_groups") or []
    }  # fmt: skip
    return [
        {"widgets": widgets, "inputs": connected, "inputGroups": groups} for widgets in combinations
    ]


INVALID = object()  # a value ComfyUI's validation refuses
MAX_COMBINATIONS = 64
MAX_CHOICES = 32
# Past this (~10^12 credits) a price is not a price: the node is unpriced, never stored.
MAX_PRICE_USD = Decimal(5 * 10**9)


def coerce(value: Any, declared: tuple[str | None, dict[str, Any]], kind: Any) -> Any:
    """A literal widget value as ComfyUI's `validate_inputs` sees it: INT and FLOAT
    converted (`"100"` is 100) and held to the declared min/max; INVALID when ComfyUI
    would refuse it."""
    input_type, options = declared
    kind = input_type if input_type in ("INT", "FLOAT") else kind
    if kind not in ("INT", "FLOAT") or value is None:
        return value
    try:
        number: int | float = int(value) if kind == "INT" else float(value)
    except (TypeError, ValueError, OverflowError):
        return INVALID
    if isinstance(number, float) and not math.isfinite(number):
        return INVALID
    low, high = options.get("min"), options.get("max")
    too_low = isinstance(low, int | float) and number < low
    too_high = isinstance(high, int | float) and number > high
    return INVALID if too_low or too_high else number


def link_values(declared: tuple[str | None, dict[str, Any]], kind: Any) -> list[Any] | None:
    """Every value a widget fed by a link may take that can change its price: the ends
    of a numeric range, both booleans, each choice of a combo; None when open."""
    input_type, options = declared
    if input_type in ("INT", "FLOAT") or kind in ("INT", "FLOAT"):
        low, high = options.get("min"), options.get("max")
        if not (_is_number(low) and _is_number(high)):
            return None
        return [low, high]
    if input_type == "BOOLEAN" or kind == "BOOLEAN":
        return [False, True]
    choices = options.get("options") if input_type == "COMBO" else options.get("__choices__")
    if isinstance(choices, list) and 0 < len(choices) <= MAX_CHOICES:
        return list(choices)
    return None


def _declared(info: dict[str, Any], name: str) -> tuple[str | None, dict[str, Any]]:
    """An input's declared type and options from `/object_info`: `["INT", {...}]`,
    `[[choices], {...}]` (a combo, choices kept under `__choices__`) or `["COMBO",
    {"options": [...]}]`."""
    spec = info.get("input")
    for section in ("required", "optional"):
        entry = spec.get(section, {}).get(name) if isinstance(spec, dict) else None
        if not isinstance(entry, list) or not entry:
            continue
        options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
        if isinstance(entry[0], list):
            return "COMBO_LIST", {**options, "__choices__": entry[0]}
        return (str(entry[0]) if isinstance(entry[0], str) else None), options
    return None, {}


def _widget(declared: Any) -> tuple[str, str | None]:
    """`depends_on.widgets` entries: {"name", "type"} (object_info) or a bare name."""
    if isinstance(declared, dict):
        return str(declared.get("name")), declared.get("type")
    return str(declared), None


def result_bounds(result: Any) -> tuple[int, int] | None:
    """A badge result as [min, max] milli-credits, or None when it names no price."""
    if not isinstance(result, dict):
        return None
    kind = result.get("type", "usd")
    if kind == "usd" and _is_number(result.get("usd")):
        low = high = result["usd"]
    elif (
        kind == "range_usd"
        and _is_number(result.get("min_usd"))
        and _is_number(result.get("max_usd"))
    ):
        low, high = sorted((result["min_usd"], result["max_usd"]))
    elif kind == "list_usd" and isinstance(result.get("usd"), list) and result["usd"]:
        values = [value for value in result["usd"] if _is_number(value)]
        if not values:
            return None
        low, high = min(values), max(values)
    else:
        return None
    factor = _suffix_factor(result.get("format"))
    if factor is None or not all(_is_finite(value) for value in (low, high)):
        return None
    low_usd, high_usd = (Decimal(str(value)) * factor for value in (low, high))
    if max(abs(low_usd), abs(high_usd)) > MAX_PRICE_USD:
        return None
    return max(0, usd_to_mc(low_usd)), max(0, usd_to_mc(high_usd))


def _suffix_factor(format_: Any) -> int | None:
    suffix = str(format_.get("suffix") or "") if isinstance(format_, dict) else ""
    if "token" in suffix.lower():
        return None  # billed by tokens: no per-run number to reserve
    if "/second" in suffix:
        return LONGEST_SECONDS
    match = MULTIPLIER.search(suffix)
    return int(match.group(1)) if match else 1


def _normalize(value: Any, kind: Any) -> Any:
    if kind in ("INT", "FLOAT"):
        return value if _is_number(value) else None
    if kind == "BOOLEAN":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value if isinstance(value, bool) else None
    if isinstance(value, bool | int | float) or value is None:
        return value
    return str(value).strip().lower()


def _default(info: dict[str, Any], name: str) -> Any:
    spec = info.get("input") if isinstance(info, dict) else None
    for section in ("required", "optional"):
        entry = (spec or {}).get(section, {}).get(name)
        if isinstance(entry, list) and len(entry) > 1 and isinstance(entry[1], dict):
            return entry[1].get("default")
    return None


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _is_finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
