"""Scorer processes that crash, stop, freeze or come and go while events keep arriving.

Every fault lands on working code: before it, the test waits (bounded) until the victim holds
partitions and has produced since its latest start, and each case asserts that every fault hit
such a scorer while events were still arriving. Each case ends with `streamer audit`: every
input must have its verdict or dead letter (0 missing, both modes), and exactly-once must show 0
duplicates to read_committed readers. The verdicts are also read back and joined to the fed
events by transaction id, and the kill cases compare every score with an uninterrupted run's.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Final

import pytest

from streamer.kafka.transactions import CALL_TIMEOUT_SECONDS, RETRY_FOR_SECONDS
from streamer.kafka.watchdog import STALL_GRACE_SECONDS
from tests.conftest import Topics
from tests.fault.support import (
    EXACTLY_ONCE,
    FAST_GROUP,
    MODES,
    Feed,
    Hit,
    Outcomes,
    Scorer,
    assert_every_hit,
    audit,
    caught_up,
    check_content,
    check_same_scores,
    committed_total,
    fault_env,
    read_outcomes,
    record,
    reference_run,
    repeat_bound,
    scaled,
    static_member,
    strike,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.timeout(900)]


def finish_and_audit(
    bootstrap: str,
    topics: Topics,
    env: dict[str, str],
    mode: str,
    tmp_path: Path,
    *,
    last_env: dict[str, str] | None = None,
) -> dict[str, object]:
    """Run one last scorer until idle (it completes whatever is left), then audit.

    `last_env`: the last scorer's environment when it differs from the audit's (a static member
    takes its slot back at once, where a new member would wait for the slot's session to end).
    """
    last = Scorer(last_env or env, tmp_path / "final.log", ("--until-idle", "3")).start()
    assert last.wait(300) == 0, last.log()[-3000:]
    assert caught_up(bootstrap, topics)
    report = audit(env, mode)
    assert report["inputs"] > 0
    return report


def check(report: dict[str, object], mode: str) -> None:
    assert report["missing"] == 0, report
    assert report["orphans"] == 0, report
    if mode == EXACTLY_ONCE:
        assert report["duplicates"] == 0, report
    assert report["returncode"] == 0, report


PROGRESS_INTERVAL: Final = "0.5"
"""Progress lines twice a second: how soon a restarted scorer is seen producing."""
DWELL_SECONDS: Final = 2.0
"""A fault lands at a random moment up to this long after its victim is seen working."""


def outcomes_of(bootstrap: str, topics: Topics) -> Outcomes:
    return read_outcomes(bootstrap, topics.output, topics.dlq)


def scored_like_uninterrupted(
    bootstrap: str,
    topics: Topics,
    env: dict[str, str],
    outcomes: Outcomes,
    feed: Feed,
    mode: str,
    folder: Path,
) -> int:
    """Check every verdict's score against a fresh uninterrupted run; the verdicts compared."""
    reference = reference_run(bootstrap, topics, env, folder)
    # Nothing interrupted the reference: one verdict per event in either mode.
    check_content(reference, feed.transaction_ids, EXACTLY_ONCE, max_repeats=0)
    return check_same_scores(outcomes, reference, mode)


@pytest.mark.parametrize("mode", MODES)
def test_kill_9_scorer_repeatedly(
    bootstrap_servers: str, topics: Topics, model_path: Path, mode: str, tmp_path: Path
) -> None:
    """kill -9 a working scorer again and again: every event scored once or more, same scores."""
    kills = scaled(4, 10)
    # At least this many events; the feed runs on until the last kill has landed (a restart
    # takes 5-8 s on 2 idle cores, most of it imports, and longer on a busy machine).
    count = scaled(30_000, 120_000)
    rate = scaled(1_000, 1_500)
    # A stable instance id: the restarted process fences its predecessor's open transaction
    # at once (exactly-once), as a supervisor restarting "the same" scorer would; a stable
    # group.instance.id gives it the partitions at once too.
    env = fault_env(
        bootstrap_servers,
        topics,
        model_path,
        mode,
        STREAMER_INSTANCE_ID="crashy",
        STREAMER_PROGRESS_INTERVAL=PROGRESS_INTERVAL,
    )
    slot_env = {**env, **static_member("crashy")}
    feed = Feed(bootstrap_servers, topics.input, count, rate, seed=1001, open_ended=True)
    rng = random.Random(7)
    feed.start()
    scorer = Scorer(slot_env, tmp_path / "scorer-0.log").start()
    hits: list[Hit] = []
    for kill in range(kills):
        scorer.wait_until_working()
        time.sleep(rng.uniform(0.0, DWELL_SECONDS))
        hits.append(strike(scorer, signal.SIGKILL, feed, bootstrap_servers, topics))
        scorer = Scorer(slot_env, tmp_path / f"scorer-{kill + 1}.log").start()
    feed.finish()
    # Joined, not necessarily producing: the feed may have ended with nothing left for it.
    scorer.wait_for_log('"partitions assigned"')
    scorer.signal(signal.SIGTERM)
    assert scorer.wait(120) == 0, scorer.log()[-3000:]

    report = finish_and_audit(bootstrap_servers, topics, env, mode, tmp_path, last_env=slot_env)
    outcomes = outcomes_of(bootstrap_servers, topics)
    bound = sum(repeat_bound(hit) for hit in hits)
    record(
        "kill -9 scorer",
        mode,
        kills=kills,
        hits=sum(hit.hit for hit in hits),
        inputs=report["inputs"],
        missing=report["missing"],
        duplicates=report["duplicates"],
        extra_outputs=report["extra_outputs"],
        repeat_bound=bound,
        faults=[hit.as_dict() for hit in hits],
    )
    assert_every_hit(hits)
    assert report["inputs"] == len(feed.transaction_ids)
    check(report, mode)
    check_content(outcomes, feed.transaction_ids, mode, max_repeats=bound)
    scored_like_uninterrupted(bootstrap_servers, topics, env, outcomes, feed, mode, tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_repeatedly(
    bootstrap_servers: str, topics: Topics, model_path: Path, mode: str, tmp_path: Path
) -> None:
    """Five clean stops of a working scorer mid-stream: no repeats even at-least-once."""
    stops = 5
    count = scaled(25_000, 100_000)
    rate = scaled(700, 1_500)
    env = fault_env(
        bootstrap_servers,
        topics,
        model_path,
        mode,
        STREAMER_INSTANCE_ID="stopper",
        STREAMER_PROGRESS_INTERVAL=PROGRESS_INTERVAL,
    )
    feed = Feed(bootstrap_servers, topics.input, count, rate, seed=1002, open_ended=True)
    rng = random.Random(8)
    feed.start()
    scorer = Scorer(env, tmp_path / "scorer-0.log").start()
    hits: list[Hit] = []
    for stop in range(stops):
        scorer.wait_until_working()
        time.sleep(rng.uniform(0.0, DWELL_SECONDS))
        hits.append(strike(scorer, signal.SIGTERM, feed, bootstrap_servers, topics))
        assert scorer.wait(120) == 0, scorer.log()[-3000:]
        assert '"stop requested"' in scorer.log()
        scorer = Scorer(env, tmp_path / f"scorer-{stop + 1}.log").start()
    feed.finish()
    # Joined, not necessarily producing: the feed may have ended with nothing left for it.
    scorer.wait_for_log('"partitions assigned"')
    scorer.signal(signal.SIGTERM)
    assert scorer.wait(120) == 0, scorer.log()[-3000:]

    report = finish_and_audit(bootstrap_servers, topics, env, mode, tmp_path)
    outcomes = outcomes_of(bootstrap_servers, topics)
    record(
        "SIGTERM x5",
        mode,
        hits=sum(hit.hit for hit in hits),
        inputs=report["inputs"],
        missing=report["missing"],
        duplicates=report["duplicates"],
        faults=[hit.as_dict() for hit in hits],
    )
    assert_every_hit(hits)
    assert report["inputs"] == len(feed.transaction_ids)
    check(report, mode)
    assert report["duplicates"] == 0, "a clean stop commits everything it produced"
    check_content(outcomes, feed.transaction_ids, mode, max_repeats=0)


@pytest.mark.parametrize("mode", MODES)
def test_zombie_scorer_is_fenced(
    bootstrap_servers: str, topics: Topics, model_path: Path, mode: str, tmp_path: Path
) -> None:
    """SIGSTOP a working scorer past max.poll.interval.ms, let another take over, then SIGCONT it.

    Exactly-once: the zombie stops with a fenced error and nothing it wrote is visible; or, if
    it froze inside a transactional call for longer than that call may take, it ends on waking
    (`zombie_ending`), exit 1 all the same. At-least-once: it rejoins; repeats are allowed,
    losses are not.
    """
    count = scaled(24_000, 60_000)
    rate = 1_500
    timeouts = {
        "STREAMER_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "STREAMER_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        "STREAMER_KAFKA_MAX_POLL_INTERVAL_MS": "7000",
        "STREAMER_PROGRESS_INTERVAL": PROGRESS_INTERVAL,
    }
    zombie_env = fault_env(
        bootstrap_servers, topics, model_path, mode, STREAMER_INSTANCE_ID="zombie", **timeouts
    )
    heir_env = fault_env(
        bootstrap_servers, topics, model_path, mode, STREAMER_INSTANCE_ID="heir", **timeouts
    )
    feed = Feed(bootstrap_servers, topics.input, count, rate, seed=1003, open_ended=True)
    feed.start()
    zombie = Scorer(zombie_env, tmp_path / "zombie.log").start()
    zombie.wait_until_working()
    hit = strike(zombie, signal.SIGSTOP, feed, bootstrap_servers, topics)
    frozen_since = time.monotonic()
    feed.stop()
    frozen_at = committed_total(bootstrap_servers, topics)
    heir = Scorer(heir_env, tmp_path / "heir.log").start()
    # The group has moved on once the heir commits past where the zombie froze; then wait
    # past max.poll.interval.ms so the zombie wakes up as a member the group has dropped.
    # Exactly-once, if the zombie froze between sending its offsets and committing, the heir
    # reads no committed offsets until that transaction times out (transaction.timeout.ms).
    wait_until(lambda: committed_total(bootstrap_servers, topics) > frozen_at + 2_000, 120, "heir")
    time.sleep(8)
    zombie.signal(signal.SIGCONT)
    frozen_s = time.monotonic() - frozen_since
    ending = "rejoined"
    if mode == EXACTLY_ONCE:
        status = zombie.wait(60)
        assert status == 1, zombie.log()[-3000:]
        ending = zombie_ending(zombie.log(), frozen_s)
    feed.finish()
    heir.wait_for_log('"partitions assigned"')
    heir.signal(signal.SIGTERM)
    assert heir.wait(120) == 0, heir.log()[-3000:]
    if mode == "at-least-once":
        zombie.signal(signal.SIGTERM)
        assert zombie.wait(120) == 0, zombie.log()[-3000:]

    report = finish_and_audit(bootstrap_servers, topics, heir_env, mode, tmp_path)
    outcomes = outcomes_of(bootstrap_servers, topics)
    record(
        "zombie (SIGSTOP past max.poll)",
        mode,
        inputs=report["inputs"],
        missing=report["missing"],
        duplicates=report["duplicates"],
        zombie_exit=zombie.wait(1),
        zombie_ending=ending,
        frozen_s=round(frozen_s, 1),
        faults=[hit.as_dict()],
    )
    assert_every_hit([hit])
    assert report["inputs"] == len(feed.transaction_ids)
    check(report, mode)
    # At-least-once repeats are not bounded here: the zombie wakes with records it fetched
    # before it froze and may score them before it learns the group has dropped it.
    check_content(outcomes, feed.transaction_ids, mode, max_repeats=len(feed.transaction_ids))


def zombie_ending(log: str, frozen_s: float) -> str:
    """How an exactly-once zombie ended: "fenced", "stalled" by its watchdog, or "gave up".

    A zombie frozen inside a transactional call wakes with the call's clock run out. If the
    watchdog's thread runs first, it ends the process (the call overran its timeout and grace);
    if the call returns first, it returns a retriable timeout, and the retry budget of that call
    has run out during the freeze too, so the scorer gives up with a fatal error. Either way it
    never learns it was fenced, and exits 1 before it can commit anything.
    """
    if "moved on without this scorer" in log:
        assert "FencedError" in log, log[-3000:]
        return "fenced"
    if "StalledError" in log:
        assert frozen_s > CALL_TIMEOUT_SECONDS + STALL_GRACE_SECONDS, (
            f"the watchdog ended the zombie though it was frozen only {frozen_s:.0f} s"
        )
        return "stalled"
    assert "KafkaFatalError" in log, log[-3000:]
    assert "Timed out" in log, log[-3000:]
    assert frozen_s > RETRY_FOR_SECONDS, (
        f"the zombie gave up retrying though it was frozen only {frozen_s:.0f} s"
    )
    return "gave up"


@pytest.mark.parametrize("mode", MODES)
def test_group_of_three_loses_one_and_gains_one(
    bootstrap_servers: str, model_path: Path, mode: str, tmp_path: Path
) -> None:
    """Three working scorers share six partitions; one is killed, a fourth joins and consumes."""
    from streamer.kafka.admin import ensure_topics

    suffix = f"{int(time.time() * 1000) % 10**9}-{random.randrange(10**6)}"
    topics = Topics(f"in-{suffix}", f"out-{suffix}", f"dlq-{suffix}", f"group-{suffix}")
    ensure_topics(
        {"bootstrap.servers": bootstrap_servers},
        [topics.input, topics.output, topics.dlq],
        partitions=6,
        replication_factor=1,
    )
    # At least this many; the feed runs on until the added member has produced.
    count = scaled(30_000, 100_000)
    rate = scaled(1_000, 2_000)
    # FAST_GROUP: the killed member is out of the group 6 s after its last heartbeat, not 45 s.
    # Exactly-once, nothing fences the open transaction of the member killed for good: the
    # coordinator aborts it after transaction.timeout.ms, and until then read_committed readers
    # (audit, the reference run) wait at it. 15 s rather than a minute.
    timing = {**FAST_GROUP, "STREAMER_PROGRESS_INTERVAL": PROGRESS_INTERVAL}
    if mode == EXACTLY_ONCE:
        timing["STREAMER_KAFKA_TRANSACTION_TIMEOUT_MS"] = "15000"
    envs = [
        fault_env(
            bootstrap_servers,
            topics,
            model_path,
            mode,
            STREAMER_INSTANCE_ID=f"member-{i}",
            **timing,
        )
        for i in range(4)
    ]
    feed = Feed(bootstrap_servers, topics.input, count, rate, seed=1004, open_ended=True)
    rng = random.Random(9)
    feed.start()
    scorers = [Scorer(envs[i], tmp_path / f"member-{i}.log").start() for i in range(3)]
    wait_until(
        lambda: all(scorer.activity().working for scorer in scorers),
        120,
        "all three members holding partitions and producing",
    )
    time.sleep(rng.uniform(0.0, DWELL_SECONDS))
    hit = strike(scorers[1], signal.SIGKILL, feed, bootstrap_servers, topics)
    takeover_s = wait_until(
        lambda: sum(len(scorers[i].activity().partitions) for i in (0, 2)) == 6,
        60,
        "the two survivors holding all six partitions",
    )
    scorers.append(Scorer(envs[3], tmp_path / "member-3.log").start())
    added = scorers[3].wait_until_working()
    added_while_feeding = feed.is_alive()
    feed.finish()
    for index in (0, 2, 3):
        scorers[index].signal(signal.SIGTERM)
    for index in (0, 2, 3):
        assert scorers[index].wait(120) == 0, scorers[index].log()[-3000:]

    report = finish_and_audit(bootstrap_servers, topics, envs[0], mode, tmp_path)
    outcomes = outcomes_of(bootstrap_servers, topics)
    record(
        "3 scorers, 1 killed, 1 added",
        mode,
        inputs=report["inputs"],
        missing=report["missing"],
        duplicates=report["duplicates"],
        takeover_s=round(takeover_s, 1),
        added_partitions=len(added.partitions),
        added_outputs=added.outputs,
        added_while_feeding=added_while_feeding,
        faults=[hit.as_dict()],
    )
    assert_every_hit([hit])
    assert added_while_feeding, (
        f"the added member held {len(added.partitions)} partitions and had produced "
        f"{added.outputs} outputs only after the feed had ended"
    )
    assert report["inputs"] == len(feed.transaction_ids)
    check(report, mode)
    check_content(outcomes, feed.transaction_ids, mode, max_repeats=repeat_bound(hit))
    scored_like_uninterrupted(bootstrap_servers, topics, envs[0], outcomes, feed, mode, tmp_path)
