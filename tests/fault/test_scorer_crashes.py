"""Scorer processes that crash, stop, freeze or come and go while events keep arriving.

Each case ends with `streamer audit`: every input must have its verdict or dead letter (0
missing, both modes), and exactly-once must show 0 duplicates to read_committed readers.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Topics
from tests.fault.support import (
    MODES,
    Feed,
    Scorer,
    audit,
    caught_up,
    committed_total,
    fault_env,
    record,
    scaled,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.timeout(900)]


def finish_and_audit(
    bootstrap: str, topics: Topics, env: dict[str, str], mode: str, tmp_path: Path
) -> dict[str, object]:
    """Run one last scorer until idle (it completes whatever is left), then audit."""
    last = Scorer(env, tmp_path / "final.log", ("--until-idle", "3")).start()
    assert last.wait(300) == 0, last.log()[-3000:]
    assert caught_up(bootstrap, topics)
    report = audit(env, mode)
    assert report["inputs"] > 0
    return report


def check(report: dict[str, object], mode: str) -> None:
    assert report["missing"] == 0, report
    assert report["orphans"] == 0, report
    if mode == "exactly-once":
        assert report["duplicates"] == 0, report
    assert report["returncode"] == 0, report


@pytest.mark.parametrize("mode", MODES)
def test_kill_9_scorer_repeatedly(
    bootstrap_servers: str, topics: Topics, model_path: Path, mode: str, tmp_path: Path
) -> None:
    """kill -9 at random moments, restarting each time: nothing missing; EOS repeats nothing."""
    kills = scaled(4, 10)
    count = scaled(30_000, 120_000)
    rate = scaled(3_000, 5_000)
    # A stable instance id: the restarted process fences its predecessor's open transaction
    # at once (exactly-once), as a supervisor restarting "the same" scorer would.
    env = fault_env(bootstrap_servers, topics, model_path, mode, STREAMER_INSTANCE_ID="crashy")
    feed = Feed(bootstrap_servers, topics.input, count, rate, seed=1001)
    rng = random.Random(7)
    feed.start()
    scorer = Scorer(env, tmp_path / "scorer-0.log").start()
    wait_until(lambda: committed_total(bootstrap_servers, topics) > 0, 120, "first commit")
    spacing = count / rate / (kills + 1)
    for kill in range(kills):
        time.sleep(rng.uniform(0.3, 1.7) * spacing)
        assert scorer.alive(), scorer.log()[-3000:]
        scorer.kill()
        scorer = Scorer(env, tmp_path / f"scorer-{kill + 1}.log").start()
    feed.finish()
    scorer.wait_for_log('"partitions assigned"')
    scorer.signal(signal.SIGTERM)
    assert scorer.wait(120) == 0, scorer.log()[-3000:]

    report = finish_and_audit(bootstrap_servers, topics, env, mode, tmp_path)
    record(
        "kill -9 scorer",
        mode,
        kills=kills,
        inputs=report["inputs"],
        missing=report["missing"],
        duplicates=report["duplicates"],
        extra_outputs=report["extra_outputs"],
    )
    assert report["inputs"] == count
    check(report, mode)


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_repeatedly(
    bootstrap_servers: str, topics: Topics, model_path: Path, mode: str, tmp_path: Path
) -> None:
    """Five clean stops mid-stream: no duplicates even at-least-once."""
    stops = 5
    count = scaled(25_000, 100_000)
    rate = scaled(3_000, 5_000)
    env = fault_env(bootstrap_servers, topics, model_path, mode, STREAMER_INSTANCE_ID="stopper")
    feed = Feed(bootstrap_servers, topics.input, count, rate, seed=1002)
    feed.start()
    scorer = Scorer(env, tmp_path / "scorer-0.log").start()
    wait_until(lambda: committed_total(bootstrap_servers, topics) > 0, 120, "first commit")
    spacing = count / rate / (stops + 1)
    for stop in range(stops):
        time.sleep(spacing)
        scorer.wait_for_log('"partitions assigned"')
        scorer.signal(signal.SIGTERM)
        assert scorer.wait(120) == 0, scorer.log()[-3000:]
        assert '"stop requested"' in scorer.log()
        scorer = Scorer(env, tmp_path / f"scorer-{stop + 1}.log").start()
    feed.finish()
    scorer.wait_for_log('"partitions assigned"')
    scorer.signal(signal.SIGTERM)
    assert scorer.wait(120) == 0, scorer.log()[-3000:]

    report = finish_and_audit(bootstrap_servers, topics, env, mode, tmp_path)
    record(
        "SIGTERM x5",
        mode,
        inputs=report["inputs"],
        missing=report["missing"],
        duplicates=report["duplicates"],
    )
    assert report["inputs"] == count
    check(report, mode)
    assert report["duplicates"] == 0, "a clean stop commits everything it produced"


@pytest.mark.parametrize("mode", MODES)
def test_zombie_scorer_is_fenced(
    bootstrap_servers: str, topics: Topics, model_path: Path, mode: str, tmp_path: Path
) -> None:
    """SIGSTOP a scorer past max.poll.interval.ms, let another take over, then SIGCONT it.

    Exactly-once: the zombie stops with a fenced error and nothing it wrote is visible.
    At-least-once: it rejoins; repeats are allowed, losses are not.
    """
    count = scaled(24_000, 60_000)
    rate = 1_500
    timeouts = {
        "STREAMER_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "STREAMER_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        "STREAMER_KAFKA_MAX_POLL_INTERVAL_MS": "7000",
    }
    zombie_env = fault_env(
        bootstrap_servers, topics, model_path, mode, STREAMER_INSTANCE_ID="zombie", **timeouts
    )
    heir_env = fault_env(
        bootstrap_servers, topics, model_path, mode, STREAMER_INSTANCE_ID="heir", **timeouts
    )
    feed = Feed(bootstrap_servers, topics.input, count, rate, seed=1003)
    feed.start()
    zombie = Scorer(zombie_env, tmp_path / "zombie.log").start()
    wait_until(lambda: committed_total(bootstrap_servers, topics) > 0, 120, "first commit")
    zombie.signal(signal.SIGSTOP)
    frozen_at = committed_total(bootstrap_servers, topics)
    heir = Scorer(heir_env, tmp_path / "heir.log").start()
    # The group has moved on once the heir commits past where the zombie froze; then wait
    # past max.poll.interval.ms so the zombie wakes up as a member the group has dropped.
    wait_until(lambda: committed_total(bootstrap_servers, topics) > frozen_at + 2_000, 120, "heir")
    time.sleep(8)
    zombie.signal(signal.SIGCONT)
    if mode == "exactly-once":
        status = zombie.wait(60)
        assert status == 1, zombie.log()[-3000:]
        assert "moved on without this scorer" in zombie.log()
        assert "FencedError" in zombie.log()
    feed.finish()
    heir.wait_for_log('"partitions assigned"')
    heir.signal(signal.SIGTERM)
    assert heir.wait(120) == 0, heir.log()[-3000:]
    if mode == "at-least-once":
        zombie.signal(signal.SIGTERM)
        assert zombie.wait(120) == 0, zombie.log()[-3000:]

    report = finish_and_audit(bootstrap_servers, topics, heir_env, mode, tmp_path)
    record(
        "zombie (SIGSTOP past max.poll)",
        mode,
        inputs=report["inputs"],
        missing=report["missing"],
        duplicates=report["duplicates"],
        zombie_exit=zombie.wait(1),
    )
    assert report["inputs"] == count
    check(report, mode)


@pytest.mark.parametrize("mode", MODES)
def test_group_of_three_loses_one_and_gains_one(
    bootstrap_servers: str, model_path: Path, mode: str, tmp_path: Path
) -> None:
    """Three scorers share six partitions; one is killed, a fourth joins: nothing missing."""
    from streamer.kafka.admin import ensure_topics

    suffix = f"{int(time.time() * 1000) % 10**9}-{random.randrange(10**6)}"
    topics = Topics(f"in-{suffix}", f"out-{suffix}", f"dlq-{suffix}", f"group-{suffix}")
    ensure_topics(
        {"bootstrap.servers": bootstrap_servers},
        [topics.input, topics.output, topics.dlq],
        partitions=6,
        replication_factor=1,
    )
    count = scaled(30_000, 100_000)
    rate = scaled(3_000, 5_000)
    envs = [
        fault_env(bootstrap_servers, topics, model_path, mode, STREAMER_INSTANCE_ID=f"member-{i}")
        for i in range(4)
    ]
    feed = Feed(bootstrap_servers, topics.input, count, rate, seed=1004)
    feed.start()
    scorers = [Scorer(envs[i], tmp_path / f"member-{i}.log").start() for i in range(3)]
    wait_until(lambda: committed_total(bootstrap_servers, topics) > 0, 120, "first commit")
    time.sleep(count / rate / 4)
    scorers[1].kill()
    time.sleep(count / rate / 4)
    scorers.append(Scorer(envs[3], tmp_path / "member-3.log").start())
    feed.finish()
    scorers[3].wait_for_log('"partitions assigned"')
    for index in (0, 2, 3):
        scorers[index].signal(signal.SIGTERM)
    for index in (0, 2, 3):
        assert scorers[index].wait(120) == 0, scorers[index].log()[-3000:]

    report = finish_and_audit(bootstrap_servers, topics, envs[0], mode, tmp_path)
    record(
        "3 scorers, 1 killed, 1 added",
        mode,
        inputs=report["inputs"],
        missing=report["missing"],
        duplicates=report["duplicates"],
    )
    assert report["inputs"] == count
    check(report, mode)
