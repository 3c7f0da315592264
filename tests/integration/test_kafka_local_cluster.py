"""scripts/kafka-local as a three-node cluster: a killed partition leader loses no acknowledged
write, producing and consuming go on through the other nodes, and the node rejoins.

The cluster is private to this module (its own free ports and temporary data folder), so these
tests do not use, or disturb, the session's broker.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from tests.conftest import KAFKA_LOCAL

NODES = 3
SCRIPT_TIMEOUT = 300.0


def _ephemeral_port_floor() -> int:
    """Lowest port the kernel hands out to outgoing connections (32768 unless configured)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port_range(count: int, avoid: range = range(0)) -> range:
    """`count` consecutive ports that are free now (none of them in `avoid`).

    Chosen below the ephemeral range: a port there cannot be taken as the source port of an
    outgoing connection (the nodes' own connections to each other, say) before a node binds it.
    """
    floor = _ephemeral_port_floor()
    low, high = max(1024, floor - 7000), floor - count
    if high <= low:  # an unusual ephemeral range: no port is safe, any will do
        low, high = 20000, 30000
    for _ in range(200):
        base = random.randrange(low, high)
        ports = range(base, base + count)
        if set(ports) & set(avoid):
            continue
        with ExitStack() as stack:
            try:
                for port in ports:
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return ports
    raise RuntimeError(f"found no {count} consecutive free ports")


def kafka_local(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KAFKA_LOCAL), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )


@dataclass(frozen=True)
class Cluster:
    env: dict[str, str]
    bootstrap: str

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return kafka_local(self.env, *args)


def _cluster_env(data: Path) -> dict[str, str]:
    brokers = _free_port_range(NODES)
    controllers = _free_port_range(NODES, avoid=brokers)
    return {
        **os.environ,
        "KAFKA_LOCAL_NODES": str(NODES),
        "KAFKA_LOCAL_PORT": str(brokers.start),
        "KAFKA_LOCAL_CONTROLLER_PORT": str(controllers.start),
        "KAFKA_LOCAL_DATA": str(data),
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = _cluster_env(tmp_path_factory.mktemp("kafka-cluster"))
    started = kafka_local(env, "start")
    try:
        if started.returncode != 0:
            pytest.fail(f"local cluster did not start:\n{started.stdout}\n{started.stderr}")
        yield Cluster(env, started.stdout.strip().splitlines()[-1])
    finally:
        kafka_local(env, "stop")


def _partitions(admin: AdminClient, topic: str) -> dict[int, tuple[int, list[int]]]:
    """Partition → (leader id, in-sync replica ids), once every partition has a leader.

    Read from a Metadata request, which any live node answers. (DescribeTopics goes to the
    node that the client's cached metadata names as controller, which may be the one killed.)
    """
    deadline = time.monotonic() + 60
    last: object = None
    while time.monotonic() < deadline:
        try:
            partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
        except KafkaException as error:
            last = error
            continue
        led = {p.id: (p.leader, sorted(p.isrs)) for p in partitions.values() if p.leader >= 0}
        if partitions and len(led) == len(partitions):
            return led
        last = f"leaders of {len(led)} of {len(partitions)} partitions"
        time.sleep(0.2)
    raise AssertionError(f"could not describe {topic} with every partition led: {last}")


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Produce with acks=all; every record must be acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    failures: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error)

    for value in values:
        producer.produce(topic, value, value, on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(60) == 0, "records left unacknowledged"
    assert not failures, failures


def _consume_all(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"cluster-test-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        values: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(values) < count:
            assert time.monotonic() < deadline, f"read {len(values)} of {count} records"
            for message in consumer.consume(1000, 0.5):
                if message.error() is None:
                    values.append(message.value() or b"")
        consumer.commit(asynchronous=False)
        return values
    finally:
        consumer.close()


@pytest.mark.integration
@pytest.mark.timeout(300)
class TestCluster:
    def test_start_reports_every_node(self, cluster: Cluster) -> None:
        """Three brokers on consecutive ports, each its own JVM, all running."""
        port = int(cluster.env["KAFKA_LOCAL_PORT"])
        assert cluster.bootstrap == ",".join(f"127.0.0.1:{port + i}" for i in range(NODES))
        assert cluster.run("bootstrap").stdout.strip() == cluster.bootstrap
        status = cluster.run("status")
        assert status.returncode == 0, status.stdout + status.stderr
        pids = {cluster.run("pid", str(node)).stdout.strip() for node in range(1, NODES + 1)}
        assert len(pids) == NODES
        assert all(pid.isdigit() for pid in pids)

    def test_a_killed_leader_loses_no_acknowledged_write(self, cluster: Cluster) -> None:
        """Kill a leader: writes go on at acks=all via the others, all are read, it rejoins."""
        admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
        topic = f"cluster-{uuid.uuid4().hex[:12]}"
        admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=3)])[
            topic
        ].result(timeout=30)
        before = [f"before-{i}".encode() for i in range(300)]
        _produce(cluster.bootstrap, topic, before)

        victim = _partitions(admin, topic)[0][0]
        killed = cluster.run("kill-node", str(victim))
        assert killed.returncode == 0, killed.stderr
        assert cluster.run("pid", str(victim)).returncode == 3
        assert cluster.run("status").returncode == 4

        during = [f"during-{i}".encode() for i in range(300)]
        _produce(cluster.bootstrap, topic, during)
        for leader, isr in _partitions(admin, topic).values():
            assert leader != victim
            assert victim not in isr
        assert sorted(_consume_all(cluster.bootstrap, topic, 600)) == sorted(before + during)

        started = cluster.run("start-node", str(victim))
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip().splitlines()[-1] == cluster.bootstrap.split(",")[victim - 1]
        deadline = time.monotonic() + 60
        while any(len(isr) < NODES for _, isr in _partitions(admin, topic).values()):
            assert time.monotonic() < deadline, "the restarted node did not rejoin the ISR"
            time.sleep(0.5)
        assert cluster.run("status").returncode == 0


class TestClusterSettings:
    """Checked before any Java runs: no broker needed."""

    def test_only_one_or_three_nodes(self, tmp_path: Path) -> None:
        """KAFKA_LOCAL_NODES=2 is refused with a message naming the variable."""
        env = {**os.environ, "KAFKA_LOCAL_NODES": "2", "KAFKA_LOCAL_DATA": str(tmp_path)}
        result = kafka_local(env, "status")
        assert result.returncode == 1
        assert "KAFKA_LOCAL_NODES must be 1" in result.stderr

    def test_default_cluster_ports(self, tmp_path: Path) -> None:
        """Without explicit ports a cluster's brokers use 9092-9094."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_LOCAL_")}
        env.update({"KAFKA_LOCAL_NODES": "3", "KAFKA_LOCAL_DATA": str(tmp_path)})
        result = kafka_local(env, "bootstrap")
        assert result.stdout.strip() == "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094"

    def test_overlapping_port_ranges_are_refused(self, tmp_path: Path) -> None:
        """Broker ports 21000-21002 and controller ports 21002-21004 overlap."""
        env = {
            **os.environ,
            "KAFKA_LOCAL_NODES": "3",
            "KAFKA_LOCAL_PORT": "21000",
            "KAFKA_LOCAL_CONTROLLER_PORT": "21002",
            "KAFKA_LOCAL_DATA": str(tmp_path),
        }
        result = kafka_local(env, "bootstrap")
        assert result.returncode == 1
        assert "overlap" in result.stderr

    @pytest.mark.parametrize(("nodes", "node"), [("3", "4"), ("3", "0"), ("3", ""), ("1", "2")])
    def test_node_number_out_of_range(self, tmp_path: Path, nodes: str, node: str) -> None:
        """A node command with a bad node number exits 2 and names the valid ones."""
        env = {**os.environ, "KAFKA_LOCAL_NODES": nodes, "KAFKA_LOCAL_DATA": str(tmp_path)}
        valid = "from 1 to 3" if nodes == "3" else "must be 1"
        for command in ("pid", "kill-node", "stop-node", "start-node"):
            result = kafka_local(env, command, *([node] if node else []))
            assert result.returncode == 2, (command, result.stderr)
            assert valid in result.stderr, (command, result.stderr)
