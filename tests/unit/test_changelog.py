"""The changelog value format: a value begins with the input position its state covers."""

from __future__ import annotations

import pytest

from streamer.kafka.changelog import POSITIONED_MARK, positioned, value_position
from streamer.state.card import CARD_HISTORY_CODEC, CardHistory


@pytest.mark.parametrize("position", [0, 1, 2**40 + 7, 2**63 - 1])
def test_a_positioned_value_gives_back_its_position_and_the_stores_value(position: int) -> None:
    stored = CARD_HISTORY_CODEC.encode(CardHistory())
    assert value_position(positioned(position) + stored) == (position, stored)


def test_a_value_without_the_mark_is_the_stores_value_alone() -> None:
    """As values were written when the position was a header: the card codec's first byte is its
    format version, never the mark."""
    stored = CARD_HISTORY_CODEC.encode(CardHistory())
    assert stored[0] != POSITIONED_MARK
    assert value_position(stored) == (None, stored)
    assert value_position(b"") == (None, b"")


def test_a_mark_without_a_whole_position_is_not_read_as_one() -> None:
    short = bytes((POSITIONED_MARK, 1, 2))
    assert value_position(short) == (None, short)
