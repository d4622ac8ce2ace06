"""Pure pricing: rule lookup, output counting, rounding, USD text and the cost of a prediction."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from app.accounting.pricing import (
    Cost,
    cost_of,
    estimate_of,
    find_rule,
    output_count,
    to_micros,
    unestimated,
    usd_text,
)
from app.config import PriceRule

D = Decimal

PRICES = [
    PriceRule(model="black-forest-labs/flux-schnell", per_prediction=D("0.001")),
    PriceRule(model="black-forest-labs/*", per_prediction=D("0.003")),
    PriceRule(model="*/multi", per_output=D("0.01")),
    PriceRule(model="llm/model-[0-9]", per_input_token=D("0.000001")),
    PriceRule(model="llm/*", per_output_token=D("0.000002")),
    PriceRule(model="*", per_second=D("0.0001")),
]


def rule(**prices: Any) -> PriceRule:
    return PriceRule(model="owner/name", **{k: D(v) for k, v in prices.items()})


class TestFindRule:
    @pytest.mark.parametrize(
        ("model", "expected_index"),
        [
            pytest.param("black-forest-labs/flux-schnell", 0, id="exact-entry-listed-first-wins"),
            pytest.param("black-forest-labs/flux-dev", 1, id="owner-glob"),
            pytest.param("someone/multi", 2, id="name-glob"),
            pytest.param("llm/model-7", 3, id="character-class"),
            pytest.param("llm/model-x", 4, id="character-class-miss-falls-through"),
            pytest.param("anyone/anything", 5, id="catch-all-last"),
            pytest.param("black-forest-labs/multi", 1, id="first-in-file-order-not-most-specific"),
        ],
    )
    def test_first_matching_entry_in_file_order(self, model: str, expected_index: int) -> None:
        assert find_rule(PRICES, model) is PRICES[expected_index]

    @pytest.mark.parametrize(
        ("prices", "model"),
        [
            pytest.param([], "a/b", id="no-prices"),
            pytest.param(PRICES[:5], "anyone/anything", id="no-glob-matches"),
            pytest.param(PRICES[:2], "Black-Forest-Labs/flux-dev", id="case-sensitive"),
            pytest.param([PriceRule(model="owner/name")], "owner/name-2", id="no-implicit-prefix"),
            pytest.param([PriceRule(model="owner/name")], "x/owner/name", id="no-implicit-suffix"),
        ],
    )
    def test_none_when_nothing_matches(self, prices: list[PriceRule], model: str) -> None:
        assert find_rule(prices, model) is None

    def test_star_matches_across_the_slash(self) -> None:
        prices = [PriceRule(model="black*schnell")]
        assert find_rule(prices, "black-forest-labs/flux-schnell") is prices[0]


class TestOutputCount:
    @pytest.mark.parametrize(
        ("output", "expected"),
        [
            pytest.param(None, 0, id="none"),
            pytest.param([], 0, id="empty-list"),
            pytest.param(["a"], 1, id="one-item-list"),
            pytest.param(["a", "b", "c"], 3, id="three-item-list"),
            pytest.param([None, None], 2, id="list-of-nulls-counts-items"),
            pytest.param("https://example.invalid/out.png", 1, id="string"),
            pytest.param("", 1, id="empty-string-is-non-null"),
            pytest.param({"a": 1, "b": 2}, 1, id="dict"),
            pytest.param(0, 1, id="zero"),
            pytest.param(False, 1, id="false"),
        ],
    )
    def test_counts_items(self, output: Any, expected: int) -> None:
        assert output_count(output) == expected


class TestToMicros:
    @pytest.mark.parametrize(
        ("usd", "expected"),
        [
            pytest.param("0", 0, id="zero"),
            pytest.param("0.009", 9000, id="exact"),
            pytest.param("1", 1_000_000, id="one-dollar"),
            pytest.param("0.0000005", 1, id="half-rounds-up"),
            pytest.param("0.0000015", 2, id="one-and-a-half-rounds-up"),
            pytest.param("0.0000025", 3, id="half-up-not-half-even"),
            pytest.param("0.00000049999", 0, id="just-below-half-rounds-down"),
            pytest.param("0.00000050001", 1, id="just-above-half-rounds-up"),
            pytest.param("0.0002527776", 253, id="fraction-rounds-up"),
            pytest.param("0.0002524999", 252, id="fraction-rounds-down"),
            pytest.param("123456.7890125", 123456789013, id="large-half"),
        ],
    )
    def test_rounds_half_up_once(self, usd: str, expected: int) -> None:
        result = to_micros(D(usd))
        assert result == expected
        assert type(result) is int


class TestUsdText:
    @pytest.mark.parametrize(
        ("micros", "expected"),
        [
            pytest.param(0, "0.000000", id="zero"),
            pytest.param(1, "0.000001", id="one-micro"),
            pytest.param(9000, "0.009000", id="sub-cent"),
            pytest.param(999_999, "0.999999", id="just-under-a-dollar"),
            pytest.param(1_000_000, "1.000000", id="one-dollar"),
            pytest.param(1_234_567_890, "1234.567890", id="thousands"),
            pytest.param(10**18 + 1, "1000000000000.000001", id="very-large-exact"),
            pytest.param(-1, "-0.000001", id="negative-micro"),
            pytest.param(-2_500_000, "-2.500000", id="negative-dollars"),
        ],
    )
    def test_exact_six_decimal_text(self, micros: int, expected: str) -> None:
        assert usd_text(micros) == expected

    @pytest.mark.parametrize("micros", [0, 1, 6000, 252_778, 10**15 + 7, -42])
    def test_round_trips_through_decimal(self, micros: int) -> None:
        assert to_micros(D(usd_text(micros))) == micros


class TestCostComponents:
    @pytest.mark.parametrize(
        ("prices", "output", "metrics", "expected"),
        [
            pytest.param({"per_prediction": "0.003"}, None, None, 3000, id="per-prediction"),
            pytest.param({"per_output": "0.01"}, ["a", "b", "c"], None, 30000, id="per-output-list"),
            pytest.param({"per_output": "0.01"}, [], None, 0, id="per-output-empty-list"),
            pytest.param({"per_output": "0.01"}, "one.png", None, 10000, id="per-output-scalar"),
            pytest.param({"per_output": "0.01"}, None, None, 0, id="per-output-none"),
            pytest.param({"per_second": "0.0012"}, None, {"predict_time": 2.5}, 3000, id="per-second"),
            pytest.param({"per_second": "0.0012"}, None, {"predict_time": "2.5"}, 3000,
                         id="per-second-string-metric"),
            pytest.param({"per_second": "0.0012"}, None, {"predict_time": 3}, 3600, id="per-second-int"),
            pytest.param({"per_second": "0.0012"}, None, {"predict_time": 0}, 0, id="per-second-zero"),
            pytest.param({"per_input_token": "0.000001"}, None, {"input_token_count": 1234}, 1234,
                         id="per-input-token"),
            pytest.param({"per_output_token": "0.000002"}, None, {"output_token_count": 500}, 1000,
                         id="per-output-token"),
            pytest.param(
                {"per_input_token": "0.000001", "per_output_token": "0.000002"},
                None, {"input_token_count": 100, "output_token_count": 50}, 200,
                id="both-token-prices",
            ),
            pytest.param(
                {"per_prediction": "0.003", "per_second": "0.0012"},
                ["x"], {"predict_time": 2.5}, 6000,
                id="per-prediction-plus-per-second",
            ),
            pytest.param(
                {"per_prediction": "0.001", "per_output": "0.002", "per_second": "0.0001",
                 "per_input_token": "0.0000001", "per_output_token": "0.0000002"},
                ["a", "b"],
                {"predict_time": 10, "input_token_count": 10, "output_token_count": 10},
                1000 + 4000 + 1000 + 1 + 2,
                id="all-components-summed",
            ),
            pytest.param({}, ["a"], {"predict_time": 9}, 0, id="rule-without-prices"),
        ],
    )
    def test_each_component(
        self, prices: dict[str, str], output: Any, metrics: dict[str, Any] | None, expected: int
    ) -> None:
        assert cost_of(rule(**prices), status="succeeded", output=output, metrics=metrics) == Cost(expected)

    def test_ignores_metrics_it_has_no_price_for(self) -> None:
        cost = cost_of(rule(per_prediction="0.003"), status="succeeded", output=None,
                       metrics={"predict_time": "garbage"})
        assert cost == Cost(3000)


class TestCostExactness:
    @pytest.mark.parametrize(
        ("prices", "metrics", "expected"),
        [
            pytest.param({"per_prediction": "0.003", "per_second": "0.0012"}, {"predict_time": 2.5}, 6000,
                         id="0.003+0.0012x2.5"),
            pytest.param({"per_second": "0.000225"}, {"predict_time": 1.123456}, 253,
                         id="0.000225x1.123456"),
            # float: 0.000225 * 3.3 * 1e6 == 742.4999999999999 would round to 742.
            pytest.param({"per_second": "0.000225"}, {"predict_time": 3.3}, 743, id="0.000225x3.3-half-up"),
            # float: 0.000115 * 0.7 * 1e6 == 80.49999999999999 would round to 80.
            pytest.param({"per_second": "0.000115"}, {"predict_time": 0.7}, 81, id="0.000115x0.7-half-up"),
            pytest.param({"per_second": "0.000001"}, {"predict_time": 0.5}, 1, id="exact-half-micro"),
            pytest.param({"per_input_token": "0.0000001"}, {"input_token_count": 15}, 2,
                         id="sum-rounded-once-half-up"),
            pytest.param({"per_input_token": "0.0000004", "per_output_token": "0.0000004"},
                         {"input_token_count": 1, "output_token_count": 1}, 1,
                         id="rounded-once-not-per-component"),
        ],
    )
    def test_decimal_arithmetic(self, prices: dict[str, str], metrics: dict[str, Any], expected: int) -> None:
        cost = cost_of(rule(**prices), status="succeeded", output=None, metrics=metrics)
        assert cost == Cost(expected)


class TestUnbilled:
    @pytest.mark.parametrize("status", ["failed", "canceled", "aborted", "starting", "processing"])
    def test_not_succeeded_costs_nothing_without_note(self, status: str) -> None:
        priced = rule(per_prediction="0.003", per_second="0.0012")
        assert cost_of(priced, status=status, output=["a"], metrics={"predict_time": 9}) == Cost(0, None)

    @pytest.mark.parametrize("status", ["failed", "canceled"])
    def test_not_succeeded_without_rule_has_no_note(self, status: str) -> None:
        assert cost_of(None, status=status, output=None, metrics=None) == Cost(0, None)

    def test_no_rule_costs_nothing_with_note(self) -> None:
        cost = cost_of(None, status="succeeded", output=["a"], metrics={"predict_time": 2})
        assert cost.micros == 0
        assert cost.note == "no price matched this model"


class TestMissingMetrics:
    @pytest.mark.parametrize(
        ("prices", "metrics", "expected_micros", "missing"),
        [
            pytest.param({"per_second": "0.0012"}, None, 0, "predict_time", id="metrics-none"),
            pytest.param({"per_second": "0.0012"}, {}, 0, "predict_time", id="metrics-empty"),
            pytest.param({"per_second": "0.0012"}, {"predict_time": None}, 0, "predict_time", id="null"),
            pytest.param({"per_second": "0.0012"}, {"predict_time": True}, 0, "predict_time", id="bool"),
            pytest.param({"per_second": "0.0012"}, {"predict_time": "abc"}, 0, "predict_time", id="text"),
            pytest.param({"per_second": "0.0012"}, {"predict_time": -1}, 0, "predict_time", id="negative"),
            pytest.param({"per_second": "0.0012"}, {"predict_time": float("nan")}, 0, "predict_time", id="nan"),
            pytest.param({"per_second": "0.0012"}, {"predict_time": float("inf")}, 0, "predict_time", id="inf"),
            pytest.param({"per_second": "0.0012"}, {"predict_time": [2]}, 0, "predict_time", id="list"),
            pytest.param({"per_prediction": "0.003", "per_second": "0.0012"}, {}, 3000, "predict_time",
                         id="other-components-still-charged"),
            pytest.param({"per_input_token": "0.000001"}, {"output_token_count": 3}, 0,
                         "input_token_count", id="input-tokens"),
            pytest.param({"per_output_token": "0.000002"}, {"input_token_count": 3}, 0,
                         "output_token_count", id="output-tokens"),
            pytest.param({"per_input_token": "0.000001", "per_output_token": "0.000002"}, {}, 0,
                         "input_token_count, output_token_count", id="both-token-counts-in-order"),
            pytest.param({"per_second": "0.0012", "per_output_token": "0.000002"},
                         {"output_token_count": 10}, 20, "predict_time", id="only-the-missing-one-named"),
        ],
    )
    def test_note_names_the_missing_metric(
        self, prices: dict[str, str], metrics: dict[str, Any] | None, expected_micros: int, missing: str
    ) -> None:
        cost = cost_of(rule(**prices), status="succeeded", output=None, metrics=metrics)
        assert cost == Cost(expected_micros, f"metrics missing: {missing}")

    def test_no_note_when_all_metrics_present(self) -> None:
        cost = cost_of(rule(per_second="0.0012"), status="succeeded", output=None,
                       metrics={"predict_time": 1})
        assert cost.note is None


class TestEstimate:
    DEFAULT = D("0.01")

    @pytest.mark.parametrize(
        ("prices", "prediction_input", "expected"),
        [
            pytest.param({"estimate": "0.05", "per_second": "0.001", "per_output": "0.01"}, {"num_outputs": 4},
                         50_000, id="explicit-estimate-wins-as-written"),
            pytest.param({"estimate": "0"}, None, 0, id="explicit-zero-estimate"),
            pytest.param({}, None, 0, id="rule-without-prices-is-free"),
            pytest.param({"per_prediction": "0.003"}, None, 3_000, id="per-prediction"),
            pytest.param({"per_output": "0.003"}, None, 3_000, id="per-output-one-by-default"),
            pytest.param({"per_output": "0.003"}, {"num_outputs": 4}, 12_000, id="per-output-num-outputs"),
            pytest.param({"per_output": "0.003"}, {"num_outputs": 0}, 3_000, id="num-outputs-at-least-one"),
            pytest.param({"per_output": "0.003"}, {"num_outputs": -2}, 3_000, id="negative-num-outputs"),
            pytest.param({"per_output": "0.003"}, {"num_outputs": 1000}, 48_000, id="num-outputs-at-most-16"),
            pytest.param({"per_output": "0.003"}, {"num_outputs": True}, 3_000, id="bool-ignored"),
            pytest.param({"per_output": "0.003"}, {"num_outputs": 4.0}, 3_000, id="float-ignored"),
            pytest.param({"per_output": "0.003"}, {"num_outputs": "4"}, 3_000, id="text-ignored"),
            pytest.param({"per_output": "0.003"}, ["num_outputs"], 3_000, id="input-not-an-object"),
            pytest.param({"per_prediction": "0.001", "per_output": "0.003"}, {"num_outputs": 2}, 7_000,
                         id="per-prediction-plus-outputs"),
            pytest.param({"per_second": "0.0012"}, None, 10_000, id="per-second-reserves-the-default"),
            pytest.param({"per_input_token": "0.000001"}, None, 10_000, id="per-input-token"),
            pytest.param({"per_output_token": "0.000002"}, None, 10_000, id="per-output-token"),
            pytest.param({"per_prediction": "0.003", "per_second": "0.0012"}, None, 13_000,
                         id="fixed-parts-plus-the-default"),
            pytest.param({"per_output": "0.003", "per_second": "0.0012"}, {"num_outputs": 3}, 19_000,
                         id="outputs-plus-the-default"),
        ],
    )
    def test_each_rule_kind(self, prices: dict[str, str], prediction_input: Any, expected: int) -> None:
        assert estimate_of(rule(**prices), self.DEFAULT, prediction_input=prediction_input) == expected

    def test_no_rule_reserves_the_default(self) -> None:
        assert estimate_of(None, self.DEFAULT, prediction_input={"num_outputs": 4}) == 10_000

    def test_the_multiplier_applies_to_the_whole_estimate(self) -> None:
        metered = rule(per_output="0.003", per_second="0.0012")
        assert estimate_of(metered, self.DEFAULT, 1_500_000, prediction_input={"num_outputs": 2}) == 24_000

    def test_metered_prices_without_an_estimate_are_listed(self) -> None:
        prices = [rule(per_second="0.001"), PriceRule(model="a/*", per_input_token=D("0.1")),
                  rule(per_second="0.001", estimate="0.01"), rule(per_output="0.003"), rule(per_prediction="1")]
        assert unestimated(prices) == prices[:2]
