"""The ids the gateway mints: Replicate's shape, unique, and in creation order."""

from __future__ import annotations

import base64
import re
import time

from app.tokens.service import new_id

REPLICATE_SHAPE = re.compile(r"[a-z2-7]{26}")


def millisecond_of(ident: str) -> int:
    """The creation millisecond in an id's first 50 bits (the alphabet mapped back to base32hex)."""
    as_hex32 = ident.translate(str.maketrans("234567abcdefghijklmnopqrstuvwxyz", "0123456789ABCDEFGHIJKLMNOPQRSTUV"))
    value = int.from_bytes(base64.b32hexdecode(as_hex32 + "00===="), "big") >> 6
    return value >> 80


def test_ids_have_replicates_shape_and_never_repeat() -> None:
    ids = [new_id() for _ in range(20_000)]
    assert all(REPLICATE_SHAPE.fullmatch(ident) for ident in ids)
    assert len(set(ids)) == len(ids)


def test_ids_made_later_sort_later() -> None:
    made = []
    for _ in range(5):
        made.append(new_id())
        time.sleep(0.002)
    assert made == sorted(made)


def test_an_id_carries_its_creation_millisecond_and_random_bits() -> None:
    before = time.time_ns() // 1_000_000
    same_moment = [new_id() for _ in range(50)]
    after = time.time_ns() // 1_000_000
    assert all(before <= millisecond_of(ident) <= after for ident in same_moment)
    # Ids of one millisecond still differ in their last 16 characters (80 random bits).
    assert len({ident[10:] for ident in same_moment}) == len(same_moment)
