"""Estimates from real price badges, copied as data in ComfyUI's /object_info format,
against hand-computed values (credits = USD x 211)."""

from __future__ import annotations

from typing import Any

import pytest

from broker.usage.pricing import Estimate, Pricer, mc_to_credits, result_bounds

FLUX_ULTRA: dict[str, Any] = {
    "api_node": True,
    "input": {"required": {"prompt": ["STRING", {}]}},
    "price_badge": {
        "engine": "jsonata",
        "depends_on": {"widgets": [], "inputs": [], "input_groups": []},
        "expr": '{"type":"usd","usd":0.06}',
    },
}
FLUX2_PRO: dict[str, Any] = {
    "api_node": True,
    "input": {
        "required": {"width": ["INT", {"default": 1024}], "height": ["INT", {"default": 768}]},
        "optional": {"images": ["IMAGE", {}]},
    },
    "price_badge": {
        "engine": "jsonata",
        "depends_on": {
            "widgets": [{"name": "width", "type": "INT"}, {"name": "height", "type": "INT"}],
            "inputs": ["images"],
            "input_groups": [],
        },
        "expr": (
            "( $MP := 1024*1024;"
            "  $outMP := $max([1, $floor(((widgets.width*widgets.height) + $MP - 1) / $MP)]);"
            "  $outputCost := 0.03 + 0.015 * ($outMP - 1);"
            "  inputs.images.connected"
            '    ? {"type":"range_usd","min_usd":$outputCost+0.015,"max_usd":$outputCost+0.12,'
            '       "format":{"approximate":true}}'
            '    : {"type":"usd","usd":$outputCost} )'
        ),
    },
}
FLUX3_VIDEO: dict[str, Any] = {
    "api_node": True,
    "input": {
        "required": {
            "resolution": [["720p", "1080p"], {"default": "720p"}],
            "duration": [["auto", "5", "10"], {"default": "5"}],
        }
    },
    "price_badge": {
        "engine": "jsonata",
        "depends_on": {
            "widgets": [
                {"name": "resolution", "type": "COMBO"},
                {"name": "duration", "type": "COMBO"},
            ],
            "inputs": [],
            "input_groups": [],
        },
        "expr": (
            '( $rate := widgets.resolution = "1080p" ? 0.4147 : 0.2431;'
            '  $type(widgets.duration) = "string" and widgets.duration != "auto"'
            '    ? {"type":"usd","usd": $rate * $number(widgets.duration)}'
            '    : {"type":"usd","usd": $rate, "format":{"suffix":"/second"}} )'
        ),
    },
}
GPT_IMAGE: dict[str, Any] = {
    "api_node": True,
    "input": {
        "required": {
            "quality": [["low", "medium", "high"], {"default": "low"}],
            "n": ["INT", {"default": 1}],
            "model": [["gpt-image-1", "gpt-image-1.5"], {}],
        }
    },
    "price_badge": {
        "engine": "jsonata",
        "depends_on": {
            "widgets": [
                {"name": "quality", "type": "COMBO"},
                {"name": "n", "type": "INT"},
                {"name": "model", "type": "COMBO"},
            ],
            "inputs": [],
            "input_groups": [],
        },
        "expr": (
            '( $ranges := $contains(widgets.model,"gpt-image-1.5")'
            '    ? {"low":[0.009,0.016],"medium":[0.037,0.056],"high":[0.134,0.240]}'
            '    : {"low":[0.011,0.020],"medium":[0.046,0.070],"high":[0.167,0.300]};'
            "  $range := $lookup($ranges, widgets.quality);"
            '  (widgets.n = 1) ? {"type":"range_usd","min_usd":$range[0],"max_usd":$range[1]}'
            '                 : {"type":"range_usd","min_usd":$range[0],"max_usd":$range[1],'
            '                    "format":{"suffix":" x " & $string(widgets.n) & "/Run"}} )'
        ),
    },
}
NODES = {
    "FluxProUltraImageNode": FLUX_ULTRA,
    "Flux2ProImageNode": FLUX2_PRO,
    "Flux3VideoNode": FLUX3_VIDEO,
    "OpenAIGPTImage1": GPT_IMAGE,
    "NoBadgeNode": {"api_node": True, "input": {}},
}


def estimate(
    class_type: str, inputs: dict[str, Any], table: dict[str, tuple[int, int]] | None = None
) -> Estimate:
    graph = {"1": {"class_type": class_type, "inputs": inputs}}
    return Pricer(table or {}).estimate(graph, NODES, [class_type])


def credits(estimate_: Any) -> tuple[str, str]:
    return str(mc_to_credits(estimate_.min_mc)), str(mc_to_credits(estimate_.max_mc))


def test_flux_ultra_is_12_66_credits() -> None:
    assert credits(estimate("FluxProUltraImageNode", {"prompt": "x"})) == ("12.660", "12.660")


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"width": 1024, "height": 1024}, ("6.330", "6.330")),  # 1 MP: $0.03
        ({"width": 2048, "height": 2048}, ("15.825", "15.825")),  # 4 MP: 0.03 + 3 x 0.015
        ({"width": 1025, "height": 1024}, ("9.495", "9.495")),  # just over 1 MP rounds up: 2 MP
        ({"width": 2048, "height": 2048, "images": ["5", 0]}, ("18.990", "41.145")),  # refs: range
    ],
)
def test_flux2_depends_on_megapixels_and_references(
    inputs: dict[str, Any], expected: tuple[str, str]
) -> None:
    assert credits(estimate("Flux2ProImageNode", inputs)) == expected


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"resolution": "720p", "duration": "5"}, ("256.471", "256.471")),  # 0.2431 x 5 x 211
        ({"resolution": "1080P ", "duration": "10"}, ("875.017", "875.017")),  # lowercased, trimmed
        ({"resolution": "1080p", "duration": "auto"}, ("1750.034", "1750.034")),  # /second x 20 s
    ],
)
def test_video_is_duration_times_resolution(
    inputs: dict[str, Any], expected: tuple[str, str]
) -> None:
    assert credits(estimate("Flux3VideoNode", inputs)) == expected


def test_range_node_and_suffix_multiplier() -> None:
    one = estimate("OpenAIGPTImage1", {"quality": "High", "n": 1, "model": "gpt-image-1.5"})
    assert credits(one) == ("28.274", "50.640")
    four = estimate("OpenAIGPTImage1", {"quality": "high", "n": 4, "model": "gpt-image-1.5"})
    assert credits(four) == ("113.096", "202.560")


def test_widget_values_are_coerced_as_comfyui_validates_them() -> None:
    """A number sent as a string is that number (ComfyUI's `int("4")`), not unpriced."""
    as_string = estimate("OpenAIGPTImage1", {"quality": "high", "n": "4", "model": "gpt-image-1.5"})
    assert credits(as_string) == ("113.096", "202.560")
    for refused in ("four", "1e400", "3.5"):
        node = estimate(
            "OpenAIGPTImage1", {"quality": "high", "n": refused, "model": "gpt-image-1"}
        )
        assert node.unpriced == ["1"], refused


def test_a_linked_widget_is_priced_at_the_worst_case_of_its_range() -> None:
    ranged = {**FLUX2_PRO, "input": {"required": {
        "width": ["INT", {"default": 1024, "min": 256, "max": 2048}],
        "height": ["INT", {"default": 768, "min": 256, "max": 2048}]}}}  # fmt: skip
    graph = {"1": {"class_type": "Flux2", "inputs": {"width": ["7", 0], "height": 2048}}}
    priced = Pricer({}).estimate(graph, {"Flux2": ranged}, ["Flux2"])
    assert credits(priced) == ("6.330", "15.825")  # 256 x 2048 (1 MP) .. 2048 x 2048 (4 MP)
    # Without a declared range, a link may carry anything: the node is unpriced.
    linked = estimate("Flux2ProImageNode", {"width": ["7", 0], "height": 768})
    assert linked.unpriced == ["1"]
    # A linked combo takes each of its choices.
    combo = estimate("OpenAIGPTImage1", {"quality": ["3", 0], "n": 1, "model": "gpt-image-1.5"})
    assert credits(combo) == ("1.899", "50.640")


def test_extreme_widget_values_are_unpriced_not_stored() -> None:
    for n in (10**30, -5, 1e30):
        node = estimate("OpenAIGPTImage1", {"quality": "high", "n": n, "model": "gpt-image-1"})
        assert node.max_mc <= 10**15, n
        assert node.min_mc >= 0, n


def test_without_badge_the_price_table_then_unpriced() -> None:
    assert credits(estimate("NoBadgeNode", {}, {"NoBadgeNode": (5_000, 20_000)})) == (
        "5.000",
        "20.000",
    )
    nothing = estimate("NoBadgeNode", {})
    assert (nothing.min_mc, nothing.max_mc, nothing.unpriced) == (0, 0, ["1"])


@pytest.mark.parametrize(
    ("result", "bounds"),
    [
        ({"type": "list_usd", "usd": [0.1, 0.05, 0.2]}, (10_550, 42_200)),
        ({"usd": 0.01}, (2_110, 2_110)),
        ({"type": "text", "text": "varies"}, None),
        (
            {
                "type": "range_usd",
                "min_usd": 0.01,
                "max_usd": 0.02,
                "format": {"suffix": " per 1K tokens"},
            },
            None,
        ),
        ("garbage", None),
    ],
)
def test_result_shapes(result: Any, bounds: tuple[int, int] | None) -> None:
    assert result_bounds(result) == bounds


class CountingPricer(Pricer):
    """Counts the badge evaluations JSONata actually runs."""

    def __init__(self) -> None:
        super().__init__({})
        self.evaluated = 0

    def _compile(self, expression: str) -> Any:
        compiled = super()._compile(expression)
        pricer = self

        class Counted:
            def evaluate(self, context: Any) -> Any:
                pricer.evaluated += 1
                return compiled.evaluate(context)

        return Counted()


def test_a_badge_is_evaluated_once_per_context() -> None:
    pricer = CountingPricer()
    inputs = {"quality": "high", "n": 4, "model": "gpt-image-1.5"}
    graph = {"1": {"class_type": "OpenAIGPTImage1", "inputs": inputs}}
    first = pricer.estimate(graph, NODES, ["OpenAIGPTImage1"])
    assert pricer.evaluated == 1
    again = pricer.estimate(graph, NODES, ["OpenAIGPTImage1"])
    assert pricer.evaluated == 1
    assert again == first
    assert credits(again) == ("113.096", "202.560")
    # Another value is another context; "4" is coerced to 4 first, the same context.
    for n in (2, "4"):
        other = {"1": {"class_type": "OpenAIGPTImage1", "inputs": {**inputs, "n": n}}}
        assert pricer.estimate(other, NODES, ["OpenAIGPTImage1"]) == estimate(
            "OpenAIGPTImage1", {**inputs, "n": n}
        )
    assert pricer.evaluated == 2


def test_equal_values_of_other_types_are_other_contexts() -> None:
    pricer = CountingPricer()
    expression = '{"type": "usd", "usd": $type(widgets.n) = "boolean" ? 2 : widgets.n}'
    answers = [
        pricer._evaluate(expression, {"widgets": {"n": n}}, "Typed") for n in (1, True, 1.0, 1)
    ]
    one, two = (211_000, 211_000), (422_000, 422_000)
    assert answers == [one, two, one, one]
    assert pricer.evaluated == 3


@pytest.mark.parametrize("usd", ["$random() * 0", '$eval("$random()") * 0', "$millis() * 0"])
def test_a_badge_that_is_not_the_contexts_alone_is_evaluated_every_time(usd: str) -> None:
    random_badge = {
        **FLUX_ULTRA,
        "price_badge": {"engine": "jsonata", "expr": f'{{"type": "usd", "usd": {usd}}}'},
    }
    pricer = CountingPricer()
    graph = {"1": {"class_type": "Random", "inputs": {}}}
    for _ in range(3):
        priced = pricer.estimate(graph, {"Random": random_badge}, ["Random"])
        assert credits(priced) == ("0.000", "0.000")
    assert pricer.evaluated == 3
