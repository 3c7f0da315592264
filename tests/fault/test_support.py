"""The fault suite's own judges, on made-up logs and outcomes (no broker)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fault.support import (
    BATCH_SIZE,
    Activity,
    Hit,
    OutageLog,
    Outcomes,
    check_content,
    check_same_scores,
    folded_retries,
    log_entries,
    repeat_bound,
    unrecovered,
)

FED = ["t1", "t2", "t3"]
REFERENCE = Outcomes([("t1", 0.1), ("t2", 0.2), ("t3", 0.3)], dead_letters=0)


def line(event: str, **fields: Any) -> bytes:
    return json.dumps({"event": event, "level": "info", **fields}).encode()


def progress(verdicts: int, dead_letters: int = 0) -> bytes:
    return line("progress", verdicts=verdicts, dead_letters=dead_letters, consumed=verdicts)


def test_working_once_assigned_and_producing() -> None:
    """Partitions held and a progress line with outputs: working."""
    lines = [line("scorer starting"), line("partitions assigned", partitions=["in[0]", "in[2]"])]
    assert not Activity.from_log(lines, 1.0).working
    activity = Activity.from_log([*lines, progress(5)], 1.0)
    assert activity.working
    assert activity.partition_numbers() == [0, 2]


def test_an_empty_assignment_is_not_working() -> None:
    """An assignment with no partitions holds nothing, whatever was produced before."""
    lines = [line("partitions assigned", partitions=[]), progress(10)]
    assert not Activity.from_log(lines, 1.0).working


@pytest.mark.parametrize("release", ["partitions revoked", "partitions lost"])
def test_revoked_or_lost_partitions_are_not_held(release: str) -> None:
    """A revoke or a loss after the assignment leaves nothing held until the next one."""
    lines = [line("partitions assigned", partitions=["in[1]"]), progress(3), line(release)]
    assert Activity.from_log(lines, 1.0).partitions == ()
    again = [*lines, line("partitions assigned", partitions=["in[0]"])]
    assert Activity.from_log(again, 1.0).partitions == ("in[0]",)


def test_outputs_are_the_highest_count_seen() -> None:
    """An exactly-once abort puts the counters back; what was produced still counts."""
    lines = [progress(40, dead_letters=2), progress(30)]
    assert Activity.from_log(lines, 1.0).outputs == 42


def test_partial_and_foreign_lines_are_skipped() -> None:
    """A line still being written, or not JSON at all, is no event."""
    lines = [b"Traceback (most recent call last):", b'{"event": "progress", "verd']
    assert Activity.from_log(lines, 1.0) == Activity((), 0, 1.0)


def test_a_hit_needs_a_working_victim_and_a_running_feed() -> None:
    """Held partitions, outputs and events still arriving: all three make a hit."""
    working = Activity(("in[0]",), 7, 3.0)
    assert Hit("SIGKILL", "scorer-0", working, feed_running=True).hit
    assert not Hit("SIGKILL", "scorer-0", working, feed_running=False).hit
    idle = Activity(("in[0]",), 0, 3.0)
    assert not Hit("SIGKILL", "scorer-0", idle, feed_running=True).hit


def test_repeat_bound_is_the_smaller_of_measured_and_a_priori() -> None:
    """What was uncommitted at the kill, capped by a commit interval at full speed."""
    activity = Activity(("in[0]", "in[1]"), 7, 3.0)
    assert repeat_bound(Hit("SIGKILL", "s", activity, True, uncommitted=500)) == 500
    capped = repeat_bound(Hit("SIGKILL", "s", activity, True, uncommitted=10**9))
    assert 2 * BATCH_SIZE < capped < 10**9


def test_content_accepts_one_verdict_each() -> None:
    """One verdict per fed transaction passes in both modes."""
    assert check_content(REFERENCE, FED, "exactly-once", 0) == {"verdicts": 3, "repeated": 0}


@pytest.mark.parametrize(
    ("outcomes", "message"),
    [
        (Outcomes([("t1", 0.1), ("t2", 0.2)], 0), "have no verdict"),
        (Outcomes([*REFERENCE.verdicts, ("t9", 0.5)], 0), "name no fed transaction"),
        (Outcomes(REFERENCE.verdicts, 1), "dead letters"),
    ],
)
def test_content_refuses_missing_unknown_or_dead_lettered(outcomes: Outcomes, message: str) -> None:
    """A lost transaction, an invented one, or a dead letter of valid input fails."""
    with pytest.raises(AssertionError, match=message):
        check_content(outcomes, FED, "at-least-once", 10)


def test_content_counts_repeats_against_the_bound() -> None:
    """At-least-once repeats pass up to the bound; exactly-once allows none."""
    repeated = Outcomes([*REFERENCE.verdicts, ("t3", 0.3), ("t1", 0.1)], 0)
    assert check_content(repeated, FED, "at-least-once", 2)["repeated"] == 2
    with pytest.raises(AssertionError, match="more than the 1"):
        check_content(repeated, FED, "at-least-once", 1)
    with pytest.raises(AssertionError, match="several verdicts"):
        check_content(repeated, FED, "exactly-once", 2)


def test_repeats_with_the_reference_score_pass() -> None:
    """At-least-once: a repeated verdict with the reference's score is the same verdict."""
    repeated = Outcomes([*REFERENCE.verdicts, ("t2", 0.2)], 0)
    assert check_same_scores(repeated, REFERENCE, "at-least-once") == 4


@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_a_different_score_fails(mode: str) -> None:
    """One transaction scored differently from the uninterrupted run fails either mode."""
    changed = Outcomes([("t1", 0.1), ("t2", 0.2), ("t3", 0.30000000000000004)], 0)
    with pytest.raises(AssertionError, match="t3"):
        check_same_scores(changed, REFERENCE, mode)


def test_a_reference_with_two_scores_for_one_id_fails() -> None:
    """The reference itself must be consistent: one score per transaction."""
    reference = Outcomes([*REFERENCE.verdicts, ("t1", 0.15)], 0)
    with pytest.raises(AssertionError, match="the reference scored t1"):
        check_same_scores(REFERENCE, reference, "at-least-once")


def all_down(client: str) -> dict[str, Any]:
    return {"event": "kafka brokers all down, retrying", "client": client}


def reachable(client: str, repeated: int = 0) -> dict[str, Any]:
    return {"event": "kafka brokers reachable again", "client": client, "repeated_errors": repeated}


def test_log_entries_are_the_json_objects() -> None:
    """Whole JSON objects only: no traceback, no half-written line, no bare value."""
    lines = [line("ready"), b"Traceback (most recent call last):", b'{"event": "pro', b"[1]"]
    assert log_entries(lines) == [{"event": "ready", "level": "info"}]


def test_an_outage_log_leaves_progress_lines_out() -> None:
    """Progress lines come on a timer, outage or not: they are not counted."""
    entries = log_entries(
        [progress(5), line("kafka brokers all down, retrying", client="producer")]
    )
    outage = OutageLog.of(entries)
    assert outage.events() == {"producer: kafka brokers all down, retrying": 1}
    assert outage.troubled == {"producer"}


def test_trouble_said_twice_by_one_client_is_repeated() -> None:
    """Once per client is the rule; the same line from two clients is not a repeat."""
    once_each = OutageLog.of([all_down("consumer"), all_down("producer")])
    assert once_each.repeated() == {}
    twice = OutageLog.of([all_down("consumer"), all_down("producer"), all_down("consumer")])
    assert twice.repeated() == {"consumer: kafka brokers all down, retrying": 2}


def test_a_client_is_unrecovered_until_a_later_recovery_line() -> None:
    """A recovery counts only after the client's last trouble line, and only for that client."""
    entries = [all_down("consumer"), all_down("producer"), reachable("producer")]
    assert unrecovered(entries, {"consumer", "producer"}) == {"consumer"}
    assert unrecovered([*entries, reachable("consumer")], {"consumer", "producer"}) == set()
    assert unrecovered([*entries, reachable("consumer"), all_down("consumer")], {"consumer"}) == {
        "consumer"
    }


def test_folded_retries_add_up_the_recovery_lines() -> None:
    """The retries each client counted instead of logging them."""
    entries = [all_down("consumer"), reachable("consumer", 529), reachable("producer", 91)]
    assert folded_retries(entries) == 620
