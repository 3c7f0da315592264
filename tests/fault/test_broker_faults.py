"""A broker of a three-node cluster crashes (kill -9) or restarts while events keep arriving.

The cluster is private to this module: `scripts/kafka-local` with KAFKA_LOCAL_NODES=3 on free
ports and a temporary data folder, replication factor 3 and min.insync.replicas=2, so one node
can go while the other two lead. The victim is the leader of input partition 0. The scorer must
ride it out on its own (same process throughout), catch up once the node is back, and
`streamer audit` must find nothing missing (and, exactly-once, nothing repeated).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from streamer.kafka.admin import ensure_topics
from tests.conftest import KAFKA_LOCAL, Topics
from tests.fault.support import (
    FULL,
    MODES,
    Feed,
    Scorer,
    audit,
    fault_env,
    record,
    scaled,
    wait_until,
)
from tests.integration.support import committed_offsets, end_offsets

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.timeout(900)]

T = TypeVar("T")

NODES: Final = 3
SCRIPT_TIMEOUT: Final = 300.0
CATCH_UP_LIMIT: Final = 60.0
"""The promise: lag back to zero within a minute of the broker returning."""
FAILOVER_RETRY_SECONDS: Final = 60.0
_FAILOVER_CODES: Final = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
    }
)
INPUT_PARTITION: Final = 0
"""The input partition whose leader is the victim."""


@dataclass(frozen=True)
class Cluster:
    env: dict[str, str]
    bootstrap: str
    first_port: int

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`scripts/kafka-local ARGS` on this cluster; fails the test if it fails."""
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
        assert 1 <= node <= NODES, f"port {broker_port} is not one of this cluster's brokers"
        return node


def _free_port_range(count: int, avoid: range = range(0)) -> range:
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A three-node cluster for this module, stopped when its last test is done."""
    brokers = _free_port_range(NODES)
    controllers = _free_port_range(NODES, avoid=brokers)
    env = {
        **os.environ,
        "KAFKA_LOCAL_NODES": str(NODES),
        "KAFKA_LOCAL_PORT": str(brokers.start),
        "KAFKA_LOCAL_CONTROLLER_PORT": str(controllers.start),
        "KAFKA_LOCAL_DATA": str(tmp_path_factory.mktemp("kafka-cluster")),
    }
    command = [str(KAFKA_LOCAL), "start"]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    try:
        if started.returncode != 0:
            pytest.fail(f"local cluster did not start:\n{started.stdout}\n{started.stderr}")
        yield Cluster(env, started.stdout.strip().splitlines()[-1], brokers.start)
    finally:
        subprocess.run(
            [str(KAFKA_LOCAL), "stop"], env=env, capture_output=True, timeout=SCRIPT_TIMEOUT
        )


@pytest.fixture
def cluster_topics(cluster: Cluster) -> Topics:
    """Fresh input, output and dead-letter topics on the cluster: 3 partitions, 3 replicas."""
    suffix = uuid.uuid4().hex[:12]
    names = Topics(
        input=f"transactions-{suffix}",
        output=f"verdicts-{suffix}",
        dlq=f"dlq-{suffix}",
        group=f"streamer-{suffix}",
    )
    ensure_topics(
        {"bootstrap.servers": cluster.bootstrap},
        [names.input, names.output, names.dlq],
        partitions=3,
        replication_factor=NODES,
    )
    return names


def leader_port(bootstrap: str, topic: str, partition: int) -> int | None:
    """The broker port of the partition's leader, or None while it has none."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    metadata = during_failover(lambda: admin.list_topics(topic, timeout=10))
    leader = metadata.topics[topic].partitions[partition].leader
    broker = metadata.brokers.get(leader)
    return None if broker is None else broker.port


def committed(bootstrap: str, topics: Topics) -> dict[int, int]:
    """The scorer group's committed input offsets (partition → offset; negative: none yet)."""
    return during_failover(lambda: committed_offsets(bootstrap, topics))


def ends(bootstrap: str, topics: Topics) -> dict[int, int]:
    """The input topic's end offsets."""
    return during_failover(lambda: end_offsets(bootstrap, topics.input))


def committed_count(bootstrap: str, topics: Topics) -> int:
    return sum(max(offset, 0) for offset in committed(bootstrap, topics).values())


def during_failover(read: Callable[[], T]) -> T:
    """`read()`, retried while the cluster moves a leader or coordinator away from a dead node.

    Admin and offset requests that land on the victim, or ask a coordinator that has just moved,
    fail with a retriable error (NOT_COORDINATOR, a timeout, a broken connection); the scorer's
    own clients retry those too.
    """
    deadline = time.monotonic() + FAILOVER_RETRY_SECONDS
    while True:
        try:
            return read()
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise
            error = exc.args[0] if exc.args else None
            if not isinstance(error, KafkaError) or not (
                error.retriable() or error.code() in _FAILOVER_CODES
            ):
                raise
        time.sleep(0.5)


def reached(committed: dict[int, int], ends: dict[int, int]) -> bool:
    return all(committed.get(partition, -1) >= end for partition, end in ends.items())


def stopped_counters(log: str) -> dict[str, Any]:
    """The counters of the scorer's last "scorer stopped" line."""
    for line in reversed(log.splitlines()):
        if '"scorer stopped"' in line:
            counters: dict[str, Any] = json.loads(line)
            return counters
    raise AssertionError(f"no 'scorer stopped' line in the log:\n{log[-3000:]}")


FAULTS: Final = ("kill -9", "clean restart")
CASES: Final = (
    [(mode, how) for mode in MODES for how in FAULTS]
    if FULL
    # Restarting a node takes 15-40 s on a small machine: the short form runs each fault once
    # and each mode once, the full form every pairing.
    else [("exactly-once", "kill -9"), ("at-least-once", "clean restart")]
)


@pytest.mark.parametrize(("mode", "how"), CASES)
def test_scorer_rides_out_a_broker_fault(
    cluster: Cluster,
    cluster_topics: Topics,
    model_path: Path,
    mode: str,
    how: str,
    tmp_path: Path,
) -> None:
    """The leader of an input partition crashes or restarts mid-stream: the scorer carries on.

    Same scorer process throughout, progress while the node is down, and once it is back the
    input produced so far committed within a minute, then lag zero within a minute of the
    feed's end (`lag_zero_after_return_s` counts from the node's return, feed time included);
    0 missing, and (exactly-once) 0 duplicates.
    """
    bootstrap = cluster.bootstrap
    topics = cluster_topics
    count = scaled(20_000, 100_000)
    rate = scaled(1_000, 2_000)
    env = fault_env(bootstrap, topics, model_path, mode, STREAMER_INSTANCE_ID="rider")
    scorer = Scorer(env, tmp_path / "scorer.log").start()
    wait_until(lambda: '"partitions assigned"' in scorer.log(), 120, "the scorer joined")
    pid = scorer.pid
    feed = Feed(bootstrap, topics.input, count, rate, seed=2001)
    feed.start()
    wait_until(lambda: committed_count(bootstrap, topics) >= rate, 120, "first commits")

    port = leader_port(bootstrap, topics.input, INPUT_PARTITION)
    assert port is not None
    victim = cluster.node_of(port)
    at_fault = committed_count(bootstrap, topics)
    down_at = time.monotonic()
    cluster.run("kill-node" if how == "kill -9" else "stop-node", str(victim))
    failover_s = wait_until(
        lambda: leader_port(bootstrap, topics.input, INPUT_PARTITION) not in (None, port),
        60,
        "a new leader for the victim's partition",
    )
    # The two remaining nodes lead: the scorer must go on committing while the victim is down.
    wait_until(
        lambda: committed_count(bootstrap, topics) >= at_fault + rate,
        CATCH_UP_LIMIT,
        "progress with a node down",
    )
    progress_while_down = committed_count(bootstrap, topics) - at_fault
    assert scorer.alive(), scorer.log()[-3000:]
    assert feed.is_alive(), "the feed should still run while the node is down; make it longer"
    restart_at = time.monotonic()
    cluster.run("start-node", str(victim))
    back_at = time.monotonic()
    # Everything produced up to the node's return, then everything: each within the minute.
    backlog = ends(bootstrap, topics)
    backlog_s = wait_until(
        lambda: reached(committed(bootstrap, topics), backlog),
        CATCH_UP_LIMIT,
        "the input up to the node's return committed",
    )
    feed.finish()
    wait_until(
        lambda: reached(committed(bootstrap, topics), ends(bootstrap, topics)),
        CATCH_UP_LIMIT,
        "lag zero after the feed ended",
    )
    lag_zero_s = time.monotonic() - back_at
    assert scorer.alive(), scorer.log()[-3000:]
    assert scorer.pid == pid
    scorer.signal(signal.SIGTERM)
    assert scorer.wait(120) == 0, scorer.log()[-3000:]
    counters = stopped_counters(scorer.log())

    report = audit(env, mode)
    record(
        f"broker {how} (leader)",
        mode,
        inputs=report["inputs"],
        missing=report["missing"],
        duplicates=report["duplicates"],
        node_down_s=round(back_at - down_at, 1),
        node_start_s=round(back_at - restart_at, 1),
        failover_s=round(failover_s, 1),
        progress_while_down=progress_while_down,
        backlog_done_after_return_s=round(backlog_s, 1),
        lag_zero_after_return_s=round(lag_zero_s, 1),
        aborted_transactions=counters["aborted_transactions"],
    )
    # The feed's producer is not idempotent: a batch in flight when its leader dies may be
    # written twice. Each copy is an input record of its own and needs its own output.
    assert report["inputs"] >= count
    assert report["missing"] == 0, report
    assert report["orphans"] == 0, report
    if mode == "exactly-once":
        assert report["duplicates"] == 0, report
    assert report["returncode"] == 0, report
