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
20-30 s. An at-least-once scorer must ride that out in the same process.

An exactly-once scorer may end instead, non-zero, on one of three known causes, all of the
transaction under way when the broker went (one commits every 0.1 s, so one nearly always is);
blocked in a transactional call, it serves no report of the outage until the call returns, so it
may say nothing while the broker is away:

- a transactional call, most often send_offsets_to_transaction, blocks past its timeout once the
  group's coordinator has gone (librdkafka #5456 and #5511), and the watchdog ends the process
  (StalledError);
- its commit waits `checkpoint.FLUSH_SECONDS` (30 s) for the transaction's outputs, then aborts
  it; the coordinator, back with no record of the transaction (its partitions never reached it),
  refuses the abort (INVALID_TXN_STATE), which librdkafka makes fatal (librdkafka #4849):
  KafkaFatalError from abort_transaction;
- while the commit waits, nothing polls the consumer, whose session then expires in librdkafka
  (no heartbeat answered for session.timeout.ms, 45 s): partitions lost, FencedError.

The test then starts it again once the broker is back, as a supervisor would (a restart while no
broker answers fails its start-up check), and requires the same outcome: nothing lost, nothing
repeated.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

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
    stopped_by,
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
one-off lines about the work it had under way (a background commit that failed, a transaction
aborted and its abort retried, the consumer rewound). A line per retry would be hundreds."""
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


def exactly_once_outage_end(entries: list[dict[str, Any]]) -> str | None:
    """Which of the module's known exactly-once causes ended the scorer, if one did."""
    stopped = stopped_by(entries)
    if stopped is None:
        return None
    error_class, error = stopped
    if error_class == "StalledError":
        return "watchdog: a transactional call blocked past its timeout"
    if (
        error_class == "KafkaFatalError"
        and error.startswith("abort_transaction")
        and "invalid state" in error
    ):
        return "abort refused: INVALID_TXN_STATE (librdkafka #4849)"
    if error_class == "FencedError" and "partitions lost" in error:
        return "consumer session expired: partitions lost"
    return None


@dataclass
class Supervisor:
    """The scorer process, and its one restart after a known exactly-once end."""

    env: dict[str, str]
    folder: Path
    mode: str
    scorers: list[Scorer] = field(default_factory=list)
    ends: list[str] = field(default_factory=list)
    """Why each earlier process ended (a known cause)."""

    @property
    def scorer(self) -> Scorer:
        return self.scorers[-1]

    def start(self) -> Scorer:
        log = self.folder / f"scorer-{len(self.scorers)}.log"
        self.scorers.append(Scorer(self.env, log).start())
        return self.scorer

    def ended(self) -> bool:
        """Whether the scorer has ended; only allowed as the module's text says, and once."""
        scorer = self.scorer
        if scorer.alive():
            return False
        if len(self.ends) == len(self.scorers):
            return True  # judged already
        status = scorer.wait(10)
        tail = scorer.log()[-3000:]
        assert self.mode == EXACTLY_ONCE, f"the scorer ended (exit {status}):\n{tail}"
        assert len(self.scorers) == 1, f"the restarted scorer ended too (exit {status}):\n{tail}"
        cause = exactly_once_outage_end(scorer.entries())
        assert status != 0, f"the scorer stopped by itself (exit 0):\n{tail}"
        assert cause is not None, f"ended (exit {status}), not as the module's text allows:\n{tail}"
        self.ends.append(cause)
        return True

    def keep_running(self) -> None:
        """Start the scorer again if it ended (as allowed)."""
        if self.ended():
            self.start()

    def kill_all(self) -> None:
        for scorer in self.scorers:
            if scorer.alive():
                scorer.kill()


@pytest.mark.parametrize("mode", MODES)
def test_scorer_rides_out_losing_every_broker(
    broker: PrivateKafka, broker_topics: Topics, model_path: Path, mode: str, tmp_path: Path
) -> None:
    """kill -9 of the only broker mid-stream, back 20-30 s later: the scorer keeps retrying and
    logs the outage once per client and change of state (a few lines in all), then that the
    brokers answer again; every fed event gets one verdict (at-least-once: repeats at most what
    was uncommitted when the broker died), no dead letters."""
    bootstrap = broker.bootstrap
    topics = broker_topics
    # One stable name, as a supervisor gives the process it restarts: its transactional id, and
    # its static group membership, so that a restart takes the ended process's partitions at
    # once rather than after its session (45 s).
    env = fault_env(
        bootstrap,
        topics,
        model_path,
        mode,
        STREAMER_INSTANCE_ID="survivor",
        STREAMER_KAFKA_GROUP_INSTANCE_ID="survivor",
    )
    supervisor = Supervisor(env, tmp_path, mode)
    rate = scaled(500, 1_000)
    # Events arrive throughout: during the outage they wait in the feed's producer.
    before = Feed(
        bootstrap, topics.input, 20 * rate, rate, seed=3001, open_ended=True, idempotent=True
    )
    try:
        scorer = supervisor.start()
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
        alive_when_restarting = scorer.alive()
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
        if mode != EXACTLY_ONCE:
            # Its loop never blocks: it reports the outage while it lasts, and rides it out.
            assert outage.troubled, f"no client reported the outage: {outage.events()}"
            assert alive_when_restarting, scorer.log()[-3000:]

        def through_outage() -> bool:
            """The scorer reported the outage and its end for every client, or ended as allowed.

            Exactly-once, a scorer blocked in a transactional call serves no report until the
            call returns or the watchdog ends the process."""
            entries = scorer.entries(down_mark)
            reported = OutageLog.of(entries).troubled & PROBED_CLIENTS
            return (bool(reported) and not unrecovered(entries, reported)) or supervisor.ended()

        wait_until(through_outage, RECOVERY_LIMIT, f"the outage reported, then {RECOVERY_EVENT!r}")
        recovery = scorer.entries(down_mark)
        if not supervisor.ends:
            # librdkafka did retry all along: the retries were counted, not logged.
            assert folded_retries(recovery) > 0, recovery[-10:]
        supervisor.keep_running()

        before.finish()
        after = Feed(
            bootstrap, topics.input, scaled(2_000, 20_000), 2 * rate, seed=3002, idempotent=True
        )
        after.start()
        after.finish()

        def left_reporting_trouble() -> set[str]:
            supervisor.keep_running()
            return unrecovered(supervisor.scorer.entries(), PROBED_CLIENTS)

        def lag_zero() -> bool:
            supervisor.keep_running()
            return caught_up(bootstrap, topics)

        # No late report of the outage (served after the recovery) is left open.
        wait_until(
            lambda: not left_reporting_trouble(),
            RECOVERY_LIMIT,
            f"{RECOVERY_EVENT!r} after every client's last trouble line",
        )
        wait_until(lag_zero, CATCH_UP_LIMIT, "the group's committed offsets at the input's end")
        scorer = supervisor.scorer
        scorer.signal(signal.SIGTERM)
        assert scorer.wait(120) == 0, scorer.log()[-3000:]
    finally:
        supervisor.kill_all()

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
        scorer_ends=supervisor.ends,
        hit=hit.as_dict(),
    )
    assert report["inputs"] == len(fed), report
    assert report["missing"] == 0, report
    assert report["orphans"] == 0, report
    if mode == EXACTLY_ONCE:
        assert report["duplicates"] == 0, report
    assert report["returncode"] == 0, report
