"""Every broker goes away (kill -9) while a scorer works, and comes back.

Only start-up gives up on unreachable brokers (after STREAMER_CONNECT_TIMEOUT); a running scorer
that loses all of them must keep retrying, and say so once per change of state, not at each of
librdkafka's retries (about 20 a second against a refused port): per client, "kafka connection
trouble" and "kafka brokers all down, retrying" at most once while the brokers are away and a few
lines in all, then "kafka brokers reachable again" once one answers, with no late report of the
outage left open after that. Every event fed before and after the outage must then get its
verdict: none missing, no dead letter, none repeated under exactly-once.

The broker is a single node private to this module (`scripts/kafka-local` on free ports and a
temporary data folder), killed mid-stream and started again on the same ports and data after
`OUTAGE_SECONDS`; its start takes as long again, so the scorer is without a broker for some
20-30 s. Both guarantees must ride that out in the same process.

Exactly-once, the transaction under way when the broker went (one commits every 0.1 s, so one
nearly always is) must wait for it, open (`checkpoint.ExactlyOnce`): no commit or abort is begun
while every broker is down, and a transactional call the kill caught midway is left to wait by
the watchdog while no broker answers. The scorer says which of the two it did; either way, the
transaction then commits and nothing is lost or repeated. Ended instead, the scorer would have
hit one of the faults this guards against: send_offsets_to_transaction stranded on a coordinator
decommissioned by a re-bootstrap (librdkafka #5511) and ended by the watchdog, an abort refused
by the returning coordinator (INVALID_TXN_STATE, fatal: librdkafka #4849), or partitions lost
while the commit waited for outputs without polling the consumer.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest

from tests.conftest import Topics, fresh_topics
from tests.fault.support import (
    EXACTLY_ONCE,
    MODES,
    RECOVERY_EVENT,
    Feed,
    Hit,
    OutageLog,
    PrivateKafka,
    Scorer,
    assert_every_hit,
    audit,
    caught_up,
    check_content,
    committed_total,
    fault_env,
    folded_retries,
    read_outcomes,
    record,
    scaled,
    start_private_kafka,
    unrecovered,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.timeout(600)]

OUTAGE_SECONDS: Final = 10.0
"""How long the broker stays dead before it is started again (its start takes 5-20 s more)."""
SCORER_CLIENTS: Final = ("consumer", "producer", "changelog reader")
"""The Kafka clients of a `streamer run` with card state (the default); each reports its own."""
PROBED_CLIENTS: Final = {"consumer", "producer"}
"""The clients whose recovery the scorer notices (`app.ScoringApp`'s probe). The changelog reader
is polled only while it restores, so it reports an outage late (at its next restore, or at the
stop) and nothing says when that outage ended."""
LINES_PER_CLIENT: Final = 4
"""The most an outage may cost in log lines per client: its trouble and all-down lines, and
one-off lines about the work it had under way (a background commit that failed, the transaction
or the transactional call that waits for the brokers, a call retried after its timeout). A line
per retry would be hundreds."""
OUTAGE_LINE_LIMIT: Final = LINES_PER_CLIENT * len(SCORER_CLIENTS)
RECOVERY_LIMIT: Final = 60.0
"""Seconds for every client to say its brokers answer again: the scorer asks every 5 s, and
librdkafka waits up to 10 s between two connection attempts."""
CATCH_UP_LIMIT: Final = 120.0


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateKafka]:
    """A single broker for this module, stopped when its last test is done.

    The JVM's quicker start (no full JIT) shortens the outage by the time a restart saves.
    """
    started = start_private_kafka(
        1, tmp_path_factory.mktemp("kafka-single"), KAFKA_LOCAL_JVM_OPTS="-XX:TieredStopAtLevel=1"
    )
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def broker_topics(broker: PrivateKafka) -> Iterator[Topics]:
    """Fresh topics on the private broker; afterwards it runs again even if the test failed with
    it down."""
    yield fresh_topics(broker.bootstrap)
    broker.run("start")


HELD_EVENTS: Final = (
    "every broker is down; the open transaction waits for them",
    "no broker answers; the blocked call waits for one",
)
"""Exactly-once: the transaction under way waited for the brokers (between calls, or in one)."""


@pytest.mark.parametrize("mode", MODES)
def test_scorer_rides_out_losing_every_broker(
    broker: PrivateKafka, broker_topics: Topics, model_path: Path, mode: str, tmp_path: Path
) -> None:
    """kill -9 of the only broker mid-stream, back 20-30 s later: the scorer keeps retrying in
    the same process and logs the outage once per client and change of state (a few lines in
    all), then that the brokers answer again; every fed event gets one verdict (at-least-once:
    repeats at most what was uncommitted when the broker died), no dead letters."""
    bootstrap = broker.bootstrap
    topics = broker_topics
    env = fault_env(bootstrap, topics, model_path, mode)
    rate = scaled(500, 1_000)
    # Events arrive throughout: during the outage they wait in the feed's producer.
    before = Feed(
        bootstrap, topics.input, 20 * rate, rate, seed=3001, open_ended=True, idempotent=True
    )
    scorer = Scorer(env, tmp_path / "scorer.log").start()
    try:
        scorer.wait_for_log('"partitions assigned"')
        before.start()
        scorer.wait_until_working()

        # kill -9 while the scorer works and events arrive; only what was past the committed
        # offsets then can be scored twice (at-least-once).
        committed_before = committed_total(bootstrap, topics)
        hit = Hit("kill -9 every broker", scorer.name, scorer.activity(), before.is_alive())
        down_mark = scorer.log_mark()
        down_at = time.monotonic()
        broker.run("kill-node", "1")
        while time.monotonic() - down_at < OUTAGE_SECONDS and scorer.alive():
            time.sleep(0.25)
        assert scorer.alive(), scorer.log()[-3000:]
        start_at = time.monotonic()
        broker.run("start")
        back_at = time.monotonic()
        before.stop()
        outage = OutageLog.of(scorer.entries(down_mark, scorer.log_mark()))

        assert_every_hit([hit])
        assert not outage.repeated(), (
            f"trouble reported more than once per client in one outage: {outage.repeated()}"
        )
        assert len(outage.entries) <= OUTAGE_LINE_LIMIT, (
            f"{len(outage.entries)} log lines while the broker was away, more than "
            f"{OUTAGE_LINE_LIMIT} ({LINES_PER_CLIENT} per client): {outage.events()}"
        )

        def through_outage() -> bool:
            """The scorer reported the outage and its end for every client that saw it (a
            scorer waiting in a transactional call serves no report until the call returns)."""
            assert scorer.alive(), scorer.log()[-3000:]
            entries = scorer.entries(down_mark)
            reported = OutageLog.of(entries).troubled & PROBED_CLIENTS
            return bool(reported) and not unrecovered(entries, reported)

        wait_until(through_outage, RECOVERY_LIMIT, f"the outage reported, then {RECOVERY_EVENT!r}")
        recovery = scorer.entries(down_mark)
        # librdkafka did retry all along: the retries were counted, not logged.
        assert folded_retries(recovery) > 0, recovery[-10:]
        held = sorted({e["event"] for e in recovery if e.get("event") in HELD_EVENTS})
        if mode == EXACTLY_ONCE:
            assert held, f"no transaction waited for the brokers: {OutageLog.of(recovery).events()}"

        before.finish()
        after = Feed(
            bootstrap, topics.input, scaled(2_000, 20_000), 2 * rate, seed=3002, idempotent=True
        )
        after.start()
        after.finish()

        def alive_and(condition: Callable[[], bool]) -> Callable[[], bool]:
            def check() -> bool:
                assert scorer.alive(), scorer.log()[-3000:]
                return condition()

            return check

        # No late report of the outage (served after the recovery) is left open.
        wait_until(
            alive_and(lambda: not unrecovered(scorer.entries(), PROBED_CLIENTS)),
            RECOVERY_LIMIT,
            f"{RECOVERY_EVENT!r} after every client's last trouble line",
        )
        wait_until(
            alive_and(lambda: caught_up(bootstrap, topics)),
            CATCH_UP_LIMIT,
            "the group's committed offsets at the input's end",
        )
        scorer.signal(signal.SIGTERM)
        assert scorer.wait(120) == 0, scorer.log()[-3000:]
    finally:
        if scorer.alive():
            scorer.kill()

    fed = before.transaction_ids + after.transaction_ids
    report = audit(env, mode)
    outcomes = read_outcomes(bootstrap, topics.output, topics.dlq)
    repeats_allowed = len(before.transaction_ids) - committed_before
    counts = check_content(outcomes, fed, mode, max_repeats=repeats_allowed)
    record(
        "every broker lost (kill -9)",
        mode,
        fed=len(fed),
        inputs=report["inputs"],
        missing=report["missing"],
        duplicates=report["duplicates"],
        **counts,
        brokers_down_s=round(back_at - down_at, 1),
        broker_start_s=round(back_at - start_at, 1),
        outage_lines=len(outage.entries),
        folded_retries=folded_retries(recovery),
        transaction_waited=held,
        hit=hit.as_dict(),
    )
    assert report["inputs"] == len(fed), report
    assert report["missing"] == 0, report
    assert report["orphans"] == 0, report
    if mode == EXACTLY_ONCE:
        assert report["duplicates"] == 0, report
    assert report["returncode"] == 0, report
