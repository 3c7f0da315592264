"""Fault-suite helpers: a paced feed, scorer processes and private brokers to kill, and the checks
of every case.

Every case reconciles with `streamer audit --json`, the same command users run, and records its
counts with `record` so the suite can print one table per run (see conftest.py). The crash cases
also read the verdicts back and judge them by content (`Outcomes`): joined to the fed events by
transaction id, and scored as an uninterrupted scorer scores the same input (`reference_run`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest

from streamer.kafka.admin import ensure_topics
from streamer.kafka.clients import OutputProducer
from streamer.serde import decode_verdict
from streamer.settings import Settings
from streamer.synthetic import LabelledTransaction, SyntheticWorld
from streamer.tools.produce import ProduceReport, publish
from tests.conftest import KAFKA_LOCAL, ROOT, Topics
from tests.integration.support import (
    committed_offsets,
    end_offsets,
    read_all,
    scorer_env,
    streamer_command,
)

FULL: Final = os.environ.get("STREAMER_FAULT_SCALE", "short") == "full"
"""`scripts/fault` runs the long form (STREAMER_FAULT_SCALE=full); the test suite the short one."""

EXACTLY_ONCE: Final = "exactly-once"
MODES: Final = ("at-least-once", EXACTLY_ONCE)
RESULTS: list[dict[str, Any]] = []
"""What each case measured, printed as a table at the end of the session."""

FAST_GROUP: Final = {
    "STREAMER_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "STREAMER_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
}
"""Group timing for scorers that come and go: a dead member is out of the group 6 s after its
last heartbeat (the broker's smallest allowed session) rather than 45 s, so its partitions move
on while the feed still runs."""

WORKING_LIMIT: Final = 90.0
"""A started scorer loads its model, joins its group and produces within this long (seconds)."""


def scaled(short: int, full: int) -> int:
    return full if FULL else short


def static_member(slot: str) -> dict[str, str]:
    """Static group membership (KIP-345) for one process slot, with `FAST_GROUP` timing.

    A restarted process with the same `group.instance.id` takes its predecessor's place and
    partitions at once, with no rebalance and no wait for the dead member's session to expire,
    as a supervisor restarting "the same" scorer would. Only for slots that are restarted: a
    static member that is stopped and not replaced holds its partitions until its session ends.
    """
    return {**FAST_GROUP, "STREAMER_KAFKA_GROUP_INSTANCE_ID": slot}


def record(case: str, mode: str, **values: Any) -> None:
    RESULTS.append({"case": case, "mode": mode, **values})


# -- a private broker or cluster, to fail at will -------------------------------------------------

SCRIPT_TIMEOUT: Final = 300.0
"""How long one `scripts/kafka-local` command on a private broker may take."""
START_ATTEMPTS: Final = 3


@dataclass(frozen=True)
class PrivateKafka:
    """A broker (`nodes` 1) or cluster (3) that `scripts/kafka-local` runs for one test module,
    on ports that were free and in a temporary folder: nobody else uses it, so it can be killed."""

    env: dict[str, str]
    bootstrap: str
    first_port: int
    nodes: int

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`scripts/kafka-local ARGS` on this broker or cluster; fails the test if it fails."""
        result = subprocess.run(
            [str(KAFKA_LOCAL), *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT,
        )
        assert result.returncode == 0, f"kafka-local {' '.join(args)}:\n{result.stderr[-3000:]}"
        return result

    def node_of(self, broker_port: int) -> int:
        """Node I of kafka-local listens on KAFKA_LOCAL_PORT + I - 1."""
        node = broker_port - self.first_port + 1
        assert 1 <= node <= self.nodes, f"port {broker_port} is not one of this cluster's brokers"
        return node

    def stop(self) -> None:
        _stop_kafka(self.env)


def free_port_range(count: int, avoid: range = range(0)) -> range:
    """`count` consecutive ports that are free now (none of them in `avoid`)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base: int = probe.getsockname()[1]
        ports = range(base, base + count)
        if ports.stop > 65536 or set(ports) & set(avoid):
            continue
        with ExitStack() as stack:
            try:
                for port in ports:
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return ports
    raise RuntimeError(f"found no {count} consecutive free ports")


def start_private_kafka(nodes: int, data: Path, **settings: str) -> PrivateKafka:
    """`kafka-local start` of `nodes` nodes in the empty folder `data`, with `settings` (more
    KAFKA_LOCAL_* variables); stop it with `PrivateKafka.stop`.

    Ports free when chosen can be taken before a node binds them (another process, or an
    outgoing connection's ephemeral port): a start that fails so is tried again on other ports.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        brokers = free_port_range(nodes)
        controllers = free_port_range(nodes, avoid=brokers)
        folder = data / f"attempt-{attempt}"
        env = {
            **os.environ,
            **settings,
            "KAFKA_LOCAL_NODES": str(nodes),
            "KAFKA_LOCAL_PORT": str(brokers.start),
            "KAFKA_LOCAL_CONTROLLER_PORT": str(controllers.start),
            "KAFKA_LOCAL_DATA": str(folder),
        }
        started = subprocess.run(
            [str(KAFKA_LOCAL), "start"], env=env, capture_output=True, text=True, timeout=600
        )
        if started.returncode == 0:
            bootstrap = started.stdout.strip().splitlines()[-1]
            return PrivateKafka(env, bootstrap, brokers.start, nodes)
        _stop_kafka(env)
        if "already in use" not in started.stderr:
            break
    pytest.fail(f"local Kafka did not start:\n{started.stdout}\n{started.stderr}")


def _stop_kafka(env: dict[str, str]) -> None:
    subprocess.run([str(KAFKA_LOCAL), "stop"], env=env, capture_output=True, timeout=SCRIPT_TIMEOUT)


OPEN_ENDED_LIMIT: Final = 4
"""An open-ended feed sends at most this many times its `count`."""


class Feed(threading.Thread):
    """Produces synthetic events at `rate` events/s in the background.

    `count` of them; or, `open_ended`, at least `count` and on at the same rate until `stop()` or
    `finish()` (at most `OPEN_ENDED_LIMIT` times as many), so that a case whose faults take
    longer on a slow or busy machine still lands every one while events arrive.

    The producer is not idempotent unless asked (`idempotent`): a batch in flight when its leader
    dies may then be written twice, as two input records that each need an output.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        count: int,
        rate: float,
        seed: int,
        *,
        open_ended: bool = False,
        idempotent: bool = False,
    ) -> None:
        super().__init__(daemon=True)
        self._producer = OutputProducer(
            {"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": idempotent}
        )
        self._topic = topic
        self._world = SyntheticWorld(seed)
        self._limit = count * OPEN_ENDED_LIMIT if open_ended else count
        self._stopping = threading.Event()
        if not open_ended:
            self._stopping.set()
        self._rate = rate
        self._sent_ids: list[str] = []
        self.count = count
        self.report: ProduceReport | None = None

    def _events(self) -> Iterator[LabelledTransaction]:
        for event in self._world.generate(self._limit):
            if len(self._sent_ids) >= self.count and self._stopping.is_set():
                return
            self._sent_ids.append(event.record["transaction_id"])
            yield event

    def run(self) -> None:
        self.report = publish(self._producer, self._topic, self._events(), rate=self._rate)

    def stop(self) -> None:
        """An open-ended feed ends once it has sent `count` (at once if it has)."""
        self._stopping.set()

    def finish(self, timeout: float = 300.0) -> ProduceReport:
        self.stop()
        self.join(timeout)
        assert not self.is_alive(), "the feed did not finish"
        assert self.report is not None
        assert self.report.acknowledged == self.report.sent >= self.count, self.report
        return self.report

    @property
    def transaction_ids(self) -> list[str]:
        """The ids of every event sent, in order (once finished)."""
        assert self.report is not None, "the feed has not finished"
        return self._sent_ids


@dataclass
class Scorer:
    """One `streamer run` process; its log goes to a file (a full pipe would block it)."""

    env: dict[str, str]
    log_path: Path
    args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    started_at: float = field(default=0.0, init=False)
    """`time.monotonic()` at the latest start."""
    _log_start: int = field(default=0, init=False)
    """Where the latest start's lines begin in the log (a log file can be appended to)."""

    @property
    def name(self) -> str:
        return self.log_path.stem

    def start(self) -> Scorer:
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.started_at = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                streamer_command("run", *self.args),
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """kill -9, and reap it."""
        self.signal(signal.SIGKILL)
        self.wait(30)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_mark(self) -> int:
        """The whole lines in the log now: a place in it for `entries`."""
        return len(self._whole_lines())

    def entries(self, since: int = 0, until: int | None = None) -> list[dict[str, Any]]:
        """The JSON entries of the log's whole lines between two marks (by default all)."""
        return log_entries(self._whole_lines()[since:until])

    def _whole_lines(self) -> list[bytes]:
        data = self.log_path.read_bytes() if self.log_path.exists() else b""
        return data[: data.rfind(b"\n") + 1].splitlines()

    def wait_for_log(self, text: str, timeout: float = 120.0) -> None:
        """Wait until the log shows `text` (e.g. that the scorer has joined its group)."""
        wait_until(lambda: text in self.log() or not self.alive(), timeout, f"log line {text!r}")
        assert self.alive(), self.log()[-3000:]

    def activity(self) -> Activity:
        """What the log says this process has done since its latest start."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_start)
            lines = log.read().splitlines()
        return Activity.from_log(lines, time.monotonic() - self.started_at)

    def wait_until_working(self, timeout: float = WORKING_LIMIT) -> Activity:
        """Wait until this process holds partitions and has produced since its latest start."""
        wait_until(
            lambda: self.activity().working or not self.alive(),
            timeout,
            f"{self.name} holding partitions and producing",
        )
        assert self.alive(), self.log()[-3000:]
        return self.activity()


def log_entries(lines: Sequence[bytes]) -> list[dict[str, Any]]:
    """The JSON objects among log lines; other lines (a traceback, a line still being written)
    are skipped."""
    entries = []
    for line in lines:
        if not line.startswith(b"{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


@dataclass(frozen=True)
class Activity:
    """A scorer's own account, from its JSON log lines since its latest start.

    `partitions`: held now (its latest "partitions assigned" line, unless a revoke or loss came
    after it). `outputs`: verdicts and dead letters produced, from its progress lines (every
    `STREAMER_PROGRESS_INTERVAL`). Both come from the process itself, so they say what that one
    member did even when several share the group; committed offsets belong to the whole group.
    """

    partitions: tuple[str, ...]
    outputs: int
    uptime: float

    @classmethod
    def from_log(cls, lines: Sequence[bytes], uptime: float) -> Activity:
        """Read one process's log lines; lines that are not whole JSON objects are skipped."""
        held: tuple[str, ...] = ()
        outputs = 0
        for entry in log_entries(lines):
            event = entry.get("event")
            if event == "partitions assigned":
                held = tuple(entry["partitions"])
            elif event in ("partitions revoked", "partitions lost"):
                held = ()
            elif event == "progress":
                # Counters since the process started; exactly-once puts them back to the last
                # commit on an abort, so the highest one seen is what it has produced.
                outputs = max(outputs, entry["verdicts"] + entry["dead_letters"])
        return cls(held, outputs, uptime)

    @property
    def working(self) -> bool:
        return bool(self.partitions) and self.outputs > 0

    def partition_numbers(self) -> list[int]:
        numbers = []
        for name in self.partitions:
            matched = re.fullmatch(r".*\[(\d+)\]", name)
            assert matched, f"not a partition name: {name!r}"
            numbers.append(int(matched.group(1)))
        return numbers


@dataclass(frozen=True)
class Hit:
    """One fault delivered to a scorer, and what the scorer was doing when it landed."""

    fault: str
    victim: str
    activity: Activity
    feed_running: bool
    uncommitted: int | None = None
    """kill -9 only: input records of the victim's partitions past the group's committed offsets
    once it is gone, the most that redoing its work can repeat."""

    @property
    def hit(self) -> bool:
        """It landed on working code: partitions held, output produced, events still arriving."""
        return self.activity.working and self.feed_running

    def as_dict(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "fault": self.fault,
            "victim": self.victim,
            "hit": self.hit,
            "partitions": len(self.activity.partitions),
            "outputs": self.activity.outputs,
            "uptime_s": round(self.activity.uptime, 1),
            "feed_running": self.feed_running,
        }
        if self.uncommitted is not None:
            shown["uncommitted"] = self.uncommitted
        return shown


def strike(
    scorer: Scorer, signum: signal.Signals, feed: Feed, bootstrap: str, topics: Topics
) -> Hit:
    """Send `signum` to `scorer` and say what it hit; SIGKILL also reaps it and measures what
    it left uncommitted (it cannot commit any more once it is gone)."""
    activity = scorer.activity()
    feed_running = feed.is_alive()
    if signum != signal.SIGKILL:
        scorer.signal(signum)
        return Hit(signum.name, scorer.name, activity, feed_running)
    scorer.kill()
    committed = committed_offsets(bootstrap, topics)
    ends = end_offsets(bootstrap, topics.input)
    uncommitted = sum(
        ends[p] - max(committed.get(p, 0), 0) for p in activity.partition_numbers() if p in ends
    )
    return Hit(signum.name, scorer.name, activity, feed_running, uncommitted)


def assert_every_hit(hits: Sequence[Hit]) -> None:
    missed = [h.as_dict() for h in hits if not h.hit]
    assert not missed, (
        f"{len(missed)} of {len(hits)} faults did not land on a working scorer (one holding "
        f"partitions and producing while events still arrived): {missed}"
    )


def fault_env(
    bootstrap: str, topics: Topics, model_path: Path, mode: str, **extra: str
) -> dict[str, str]:
    settings = {"STREAMER_PROCESSING_GUARANTEE": mode, "STREAMER_PROGRESS_INTERVAL": "2", **extra}
    return scorer_env(bootstrap, topics, model_path, **settings)


def audit(env: dict[str, str], mode: str) -> dict[str, Any]:
    """`streamer audit --json --expect <mode>`; the report with its exit status."""
    result = subprocess.run(
        streamer_command("audit", "--json", "--expect", mode),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    assert result.stdout.strip(), f"audit printed no report:\n{result.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(result.stdout)
    report["returncode"] = result.returncode
    return report


def caught_up(bootstrap: str, topics: Topics) -> bool:
    """The group's committed offsets have reached the input topic's end offsets."""
    ends = end_offsets(bootstrap, topics.input)
    committed = committed_offsets(bootstrap, topics)
    return all(committed.get(p, -1) >= end for p, end in ends.items())


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.25) -> float:
    """Poll `condition()` until true; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out after {timeout:.0f}s: {what}"
        time.sleep(interval)
    return time.monotonic() - started


def committed_total(bootstrap: str, topics: Topics) -> int:
    return sum(max(offset, 0) for offset in committed_offsets(bootstrap, topics).values())


# -- what a scorer says while its brokers are away ------------------------------------------------

TROUBLE_EVENTS: Final = ("kafka connection trouble", "kafka brokers all down, retrying")
"""How a client reports that its brokers fail (`kafka.clients.ClientErrors`): once per outage."""
RECOVERY_EVENT: Final = "kafka brokers reachable again"


@dataclass(frozen=True)
class OutageLog:
    """A scorer's log entries from an outage, progress lines aside: those come every
    `STREAMER_PROGRESS_INTERVAL` whatever happens, and say nothing about the outage."""

    entries: tuple[dict[str, Any], ...]

    @classmethod
    def of(cls, entries: Sequence[dict[str, Any]]) -> OutageLog:
        return cls(tuple(entry for entry in entries if entry.get("event") != "progress"))

    @property
    def troubled(self) -> set[str]:
        """The clients that reported trouble."""
        return {
            str(entry.get("client"))
            for entry in self.entries
            if entry.get("event") in TROUBLE_EVENTS
        }

    def repeated(self) -> dict[str, int]:
        """ "client: event" → how often, for each trouble line a client gave more than once."""
        said = Counter(
            f"{entry.get('client')}: {entry['event']}"
            for entry in self.entries
            if entry.get("event") in TROUBLE_EVENTS
        )
        return {line: count for line, count in said.items() if count > 1}

    def events(self) -> dict[str, int]:
        """Each event (prefixed by its client, if any) and how often it was logged."""
        return dict(
            Counter(
                f"{entry['client']}: {entry.get('event')}"
                if "client" in entry
                else str(entry.get("event"))
                for entry in self.entries
            )
        )


def unrecovered(entries: Sequence[dict[str, Any]], clients: set[str]) -> set[str]:
    """Those of `clients` whose last trouble line in `entries` has no recovery line after it."""
    pending: set[str] = set()
    for entry in entries:
        client = str(entry.get("client"))
        if client not in clients:
            continue
        if entry.get("event") in TROUBLE_EVENTS:
            pending.add(client)
        elif entry.get("event") == RECOVERY_EVENT:
            pending.discard(client)
    return pending


def folded_retries(entries: Sequence[dict[str, Any]]) -> int:
    """The retries the recovery lines say were counted rather than logged."""
    return sum(
        int(entry.get("repeated_errors", 0))
        for entry in entries
        if entry.get("event") == RECOVERY_EVENT
    )


# -- judging by content ---------------------------------------------------------------------------

_DEFAULTS: Final = Settings.model_construct()
"""The scorer's defaults (no environment read): the fault cases do not change these two."""
COMMIT_INTERVAL_SECONDS: Final = _DEFAULTS.commit_interval
"""At-least-once: the checkpoint commits offsets this often."""
BATCH_SIZE: Final = _DEFAULTS.batch_size
PEAK_EVENTS_PER_SECOND: Final = 30_000
"""Faster than a scorer runs on the 2-core machine the suite is sized for (about 28,000 events/s
alone, README "Performance"); with the feed and the broker beside it, it runs slower."""


def repeat_bound(hit: Hit) -> int:
    """The most verdicts an at-least-once kill -9 can repeat.

    What the victim produced past its last commit: at most one commit interval of acknowledged
    outputs at the fastest it can score, plus a batch per partition it held awaiting
    acknowledgement. Never more than the records past the committed offsets once it was gone
    (it cannot have scored records that were not there yet): the tighter bound whenever the
    scorer kept up with the feed.
    """
    assert hit.uncommitted is not None, "measured for kill -9 only"
    in_flight = BATCH_SIZE * len(hit.activity.partitions)
    a_priori = in_flight + int(COMMIT_INTERVAL_SECONDS * PEAK_EVENTS_PER_SECOND)
    return min(hit.uncommitted, a_priori)


@dataclass(frozen=True)
class Outcomes:
    """What came out of the stream: (transaction id, score) per verdict, and the dead letters."""

    verdicts: list[tuple[str, float]]
    dead_letters: int

    @property
    def scores(self) -> dict[str, set[float]]:
        """Every score given to each transaction id."""
        by_id: dict[str, set[float]] = {}
        for transaction_id, score in self.verdicts:
            by_id.setdefault(transaction_id, set()).add(score)
        return by_id


def read_outcomes(bootstrap: str, output_topic: str, dlq_topic: str) -> Outcomes:
    """Every committed verdict and dead letter (read_committed), verdicts decoded."""
    verdicts = []
    for message in read_all(bootstrap, output_topic, timeout=120):
        assert message.value is not None, message
        verdict = decode_verdict(message.value)
        verdicts.append((verdict["transaction_id"], verdict["score"]))
    return Outcomes(verdicts, len(read_all(bootstrap, dlq_topic, timeout=120)))


def check_content(
    outcomes: Outcomes, fed: Sequence[str], mode: str, max_repeats: int
) -> dict[str, int]:
    """Join the verdicts to the fed events by transaction id; return the counts.

    Every fed event is valid, so: no dead letters; a verdict for every fed transaction and for
    nothing else; exactly-once, exactly one each; at-least-once, at most `max_repeats` extra.
    """
    counts = Counter(transaction_id for transaction_id, _ in outcomes.verdicts)
    fed_ids = set(fed)
    assert len(fed_ids) == len(fed), "the feed sent a transaction id twice"
    missing = fed_ids - counts.keys()
    unknown = counts.keys() - fed_ids
    repeats = len(outcomes.verdicts) - len(counts)
    assert not missing, f"{len(missing)} fed transactions have no verdict: {sorted(missing)[:3]}"
    assert not unknown, f"{len(unknown)} verdicts name no fed transaction: {sorted(unknown)[:3]}"
    assert outcomes.dead_letters == 0, f"{outcomes.dead_letters} dead letters, all input was valid"
    if mode == EXACTLY_ONCE:
        repeated = [tid for tid, n in counts.items() if n > 1]
        assert not repeated, f"{len(repeated)} transactions have several verdicts: {repeated[:3]}"
    else:
        assert repeats <= max_repeats, (
            f"{repeats} repeated verdicts, more than the {max_repeats} the kills can explain "
            "(per kill: what was past the committed offsets, at most one commit interval at full "
            "speed plus a batch per partition; see repeat_bound)"
        )
    return {"verdicts": len(outcomes.verdicts), "repeated": repeats}


def reference_run(
    bootstrap: str, topics: Topics, env: dict[str, str], folder: Path, until_idle: float = 3.0
) -> Outcomes:
    """Score the same input topic again with one fresh scorer, uninterrupted; its outcomes.

    Fresh group (so fresh offsets, and fresh per-card state once the scorer keeps some: its
    changelog is named after the group), fresh output and dead-letter topics, same guarantee and
    model; nothing of the fault case's own group, instance ids or membership.
    """
    reference = Topics(
        input=topics.input,
        output=f"{topics.output}-reference",
        dlq=f"{topics.dlq}-reference",
        group=f"{topics.group}-reference",
    )
    ensure_topics({"bootstrap.servers": bootstrap}, [reference.output, reference.dlq], partitions=3)
    reference_env = {
        name: value
        for name, value in env.items()
        if name not in ("STREAMER_INSTANCE_ID", "STREAMER_KAFKA_GROUP_INSTANCE_ID")
    }
    reference_env.update(
        {
            "STREAMER_OUTPUT_TOPIC": reference.output,
            "STREAMER_DLQ_TOPIC": reference.dlq,
            "STREAMER_GROUP_ID": reference.group,
        }
    )
    scorer = Scorer(reference_env, folder / "reference.log", ("--until-idle", str(until_idle)))
    assert scorer.start().wait(300) == 0, scorer.log()[-3000:]
    assert caught_up(bootstrap, reference), "the reference scorer stopped before the end"
    log = scorer.log()
    assert log.count('"partitions assigned"') == 1, "the reference run was rebalanced"
    return read_outcomes(bootstrap, reference.output, reference.dlq)


def check_same_scores(outcomes: Outcomes, reference: Outcomes, mode: str) -> int:
    """Every verdict carries the score the uninterrupted reference gave its transaction.

    Exactly-once: the two sets of (transaction id, score) are identical. At-least-once: every
    verdict, repeats included, has the reference's score. Returns the verdicts compared.
    """
    expected: dict[str, float] = {}
    for transaction_id, scores in reference.scores.items():
        assert len(scores) == 1, f"the reference scored {transaction_id} as {sorted(scores)}"
        expected[transaction_id] = next(iter(scores))
    if mode == EXACTLY_ONCE:
        differ = set(outcomes.verdicts) ^ set(reference.verdicts)
        assert not differ, (
            f"{len(differ)} (transaction id, score) pairs are in one run only, "
            f"e.g. {sorted(differ)[:4]}"
        )
    differ_list = [
        (tid, score, expected.get(tid))
        for tid, score in outcomes.verdicts
        if expected.get(tid) != score
    ]
    assert not differ_list, (
        f"{len(differ_list)} of {len(outcomes.verdicts)} verdicts differ from the uninterrupted "
        f"run's score (transaction id, score, reference): {differ_list[:4]}"
    )
    return len(outcomes.verdicts)
