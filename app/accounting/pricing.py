"""Pure pricing: the cost of a finished prediction in integer micro-dollars."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation, localcontext
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any

from app.config import PriceRule

MICROS_PER_USD = Decimal(1_000_000)
ONE_PPM = 1_000_000  # a price multiplier of 1.0, in parts per million
BILLED_STATUSES = frozenset({"succeeded"})
# The most outputs an estimate holds, whatever `num_outputs` says: an absurd count must not
# overflow the ledger's columns, and a model giving more overruns by the difference only.
MAX_ESTIMATED_OUTPUTS = 16


@dataclass(frozen=True)
class Cost:
    """A computed cost, with a note when something needed for it was missing."""

    micros: int
    note: str | None = None


def find_rule(prices: Sequence[PriceRule], model: str) -> PriceRule | None:
    """The first price entry, in file order, whose glob matches `owner/name`."""
    return next((rule for rule in prices if fnmatchcase(model, rule.model)), None)


def output_count(output: Any) -> int:
    """Output items: a list's length, 1 for any other non-null value."""
    if output is None:
        return 0
    if isinstance(output, list):
        return len(output)
    return 1


def _metric(metrics: dict[str, Any] | None, name: str) -> Decimal | None:
    value = (metrics or {}).get(name)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return None
    return amount if amount.is_finite() and amount >= 0 else None


# Every create prices its estimate with the same few rules: a Decimal context of 100 digits per
# call cost as much as the rest of the estimate.
@lru_cache(maxsize=4096)
def to_micros(usd: Decimal, ppm: int = ONE_PPM) -> int:
    """USD, times a multiplier in parts per million, to micro-dollars, rounded half up once."""
    with localcontext() as context:
        # Enough digits that the product is exact and the one rounding is the quantize below.
        context.prec = 100
        return int((usd * MICROS_PER_USD * ppm / ONE_PPM).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def usd_text(micros: int) -> str:
    """Micro-dollars as an exact USD string with six decimals, e.g. "0.009000"."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def metered(rule: PriceRule) -> bool:
    """Whether part of the rule's price is known only after the run (predict_time or tokens)."""
    return rule.per_second is not None or rule.per_input_token is not None or rule.per_output_token is not None


def unestimated(prices: Sequence[PriceRule]) -> list[PriceRule]:
    """The metered rules with no `estimate`, for which the metered estimate is reserved."""
    return [rule for rule in prices if rule.estimate is None and metered(rule)]


def requested_outputs(prediction_input: Any) -> int:
    """The outputs a create asks for: an integer `num_outputs` clamped to 1..16, else 1."""
    if isinstance(prediction_input, dict):
        count = prediction_input.get("num_outputs")
        if isinstance(count, int) and not isinstance(count, bool):
            return min(max(count, 1), MAX_ESTIMATED_OUTPUTS)
    return 1


def estimate_of(
    rule: PriceRule | None, default: Decimal, ppm: int = ONE_PPM, *, prediction_input: Any = None,
    metered_default: Decimal | None = None,
) -> int:
    """Micro-dollars to reserve, times the multiplier `ppm`: the rule's `estimate`, else its fixed
    parts (one `per_output` per requested output) plus `metered_default` (`default` if not given)
    when it is metered; `default` when no rule matched."""
    if rule is None:
        return to_micros(default, ppm)
    if rule.estimate is not None:
        return to_micros(rule.estimate, ppm)
    usd = rule.per_prediction or Decimal(0)
    if rule.per_output is not None:
        usd += rule.per_output * requested_outputs(prediction_input)
    if metered(rule):
        # Reserving only the fixed parts would hold nothing for what the run adds, and a burst of
        # creates would all fit a budget not yet spent (P3).
        usd += default if metered_default is None else metered_default
    return to_micros(usd, ppm)


def cost_of(
    rule: PriceRule | None,
    *,
    status: str,
    output: Any,
    metrics: dict[str, Any] | None,
    ppm: int = ONE_PPM,
) -> Cost:
    """What a prediction that ended in `status` costs under `rule`, times the multiplier `ppm`."""
    if status not in BILLED_STATUSES and not (rule is not None and rule.bill_failures):
        return Cost(0)
    if rule is None:
        return Cost(0, "no price matched this model")
    total = Decimal(0)
    missing: list[str] = []
    if rule.per_prediction is not None:
        total += rule.per_prediction
    if rule.per_output is not None:
        total += rule.per_output * output_count(output)
    for price, metric in (
        (rule.per_second, "predict_time"),
        (rule.per_input_token, "input_token_count"),
        (rule.per_output_token, "output_token_count"),
    ):
        if price is None:
            continue
        amount = _metric(metrics, metric)
        if amount is None:
            missing.append(metric)
        else:
            total += price * amount
    note = f"metrics missing: {', '.join(missing)}" if missing else None
    return Cost(to_micros(total, ppm), note)
