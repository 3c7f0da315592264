"""`python -m streamer.tools.bench serve`: `streamer serve` under load, on loopback.

What it measures, with one and with two worker processes:

- **Replica catch-up**: the card history changelog is filled first (the histories of a synthetic
  stream, written chunk by chunk as the scorer's checkpoints write them); the server's own log line
  `changelog replica caught up` gives records, seconds and records/s from its start.
- **`POST /v1/score` latency at constant rates** (open loop: requests are sent on schedule
  whether or not earlier ones were answered, so a slow answer cannot hide the ones queued behind
  it). The load generator is vegeta (`go install github.com/tsenart/vegeta/v12@v12.13.0`): plain
  wrk is closed-loop and cannot hold a rate, and a Python generator would compete with the server
  for the same cores. Each rate gets an unmeasured warm-up, then a measured attack; p50, p99,
  max and the share of 200 answers. "Highest rate with p99 <= 20 ms" is among the rates tried.
- **`POST /v1/score/batch` throughput**: full batches (`STREAMER_HTTP_MAX_BATCH`) sent back to back
  by as many clients as workers, transactions scored per second.

Each request is a held-out transaction of a card with history, so every one decodes a history.
Needs a broker and a trained model, like the main bench.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx2
from confluent_kafka.admin import AdminClient

from streamer.kafka.admin import ensure_topics
from streamer.kafka.changelog import changelog_topic, ensure_changelog, positioned
from streamer.kafka.clients import OutputProducer
from streamer.model.scorer import Scorer
from streamer.pipeline import Histories, Pipeline
from streamer.serde import encode_transaction
from streamer.settings import Settings
from streamer.state.card import CARD_HISTORY_CODEC
from streamer.synthetic import SyntheticWorld

P99_TARGET_SECONDS: Final = 0.020
READY_TIMEOUT: Final = 180.0


@dataclass(frozen=True)
class ServeBenchOptions:
    cards: int = 20_000
    history_events: int = 200_000
    chunk_events: int = 5_000
    """Events per simulated checkpoint: each writes the histories it changed."""
    rates: tuple[float, ...] = (200, 500, 1000, 1500)
    seconds: float = 8.0
    """Measured seconds per rate."""
    warmup_seconds: float = 2.0
    batch_seconds: float = 5.0
    workers: tuple[int, ...] = (1, 2)
    vegeta: str | None = None
    out_dir: Path = Path("bench-results")


@dataclass
class RateResult:
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    success: float
    requests: int


@dataclass
class WorkersResult:
    workers: int
    catch_up_records: int
    catch_up_seconds: float
    catch_up_records_per_second: float
    rates: list[RateResult] = field(default_factory=list)
    batch_transactions_per_second: float = 0.0
    batch_p50_ms: float = 0.0

    @property
    def best_rate(self) -> float | None:
        within = [r.rate for r in self.rates if r.p99_ms <= P99_TARGET_SECONDS * 1000]
        return max(within) if within else None


def run_serve_bench(settings: Settings, options: ServeBenchOptions, model_path: Path) -> str:
    """Run the whole serve bench; the markdown table (also written with JSON to `out_dir`)."""
    vegeta = options.vegeta or shutil.which("vegeta") or _go_bin("vegeta")
    if vegeta is None:
        raise SystemExit(
            "bench serve: vegeta not found; `go install github.com/tsenart/vegeta/v12@v12.13.0` "
            "(or pass --vegeta PATH)"
        )
    suffix = uuid.uuid4().hex[:8]
    group = f"bench-serve-{suffix}"
    input_topic = f"bench-serve-in-{suffix}"
    admin = settings.admin_config()
    ensure_topics(admin, [input_topic], partitions=3)
    changelog = changelog_topic(group, "card-state")
    ensure_changelog(admin, changelog, input_topic)
    try:
        requests = _fill_changelog(settings, changelog, options, model_path)
        results = []
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
            targets = Path(scratch) / "targets.jsonl"
            for workers in options.workers:
                results.append(
                    _measure(
                        settings, options, model_path, group, workers, requests, targets, vegeta
                    )
                )
    finally:
        AdminClient(admin).delete_topics([input_topic, changelog])
    table = _table(results, options) + (
        f"\nLoad average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
        "(other processes share them).\n"
    )
    directory = options.out_dir / time.strftime("serve-%Y%m%dT%H%M%SZ", time.gmtime())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "serve.json").write_text(
        json.dumps(
            {
                "options": {**asdict(options), "out_dir": str(options.out_dir)},
                "results": [{**asdict(r), "best_rate": r.best_rate} for r in results],
            },
            indent=2,
        )
    )
    (directory / "serve.md").write_text(table)
    print(f"bench serve: results in {directory}", file=sys.stderr)
    return table


def _go_bin(name: str) -> str | None:
    gopath = os.environ.get("GOPATH") or str(Path.home() / "go")
    path = Path(gopath) / "bin" / name
    return str(path) if path.exists() else None


def _fill_changelog(
    settings: Settings, topic: str, options: ServeBenchOptions, model_path: Path
) -> list[dict[str, Any]]:
    """Write a synthetic stream's card histories to `topic`, as checkpoints would; return each
    card's next transaction (the requests)."""
    world = SyntheticWorld(17, n_cards=options.cards)
    pipeline = Pipeline(Scorer.from_path(model_path), max_event_bytes=settings.max_event_bytes)
    histories = Histories()
    producer = OutputProducer(settings.producer_config(), "bench changelog writer")
    written = 0
    events = world.generate(options.history_events)
    while True:
        chunk = [e.record for _, e in zip(range(options.chunk_events), events, strict=False)]
        if not chunk:
            break
        values = [encode_transaction(r) for r in chunk]
        pipeline.process(values, [r["card_id"].encode() for r in chunk], histories)
        for card in {r["card_id"] for r in chunk}:
            # As a checkpoint writes it, covering no input (the bench has no input topic).
            value = positioned(0) + CARD_HISTORY_CODEC.encode(histories.histories[card])
            producer.produce(topic, card.encode(), value, [], None)
            written += 1
    if producer.flush(60) != 0:
        raise SystemExit("bench serve: the changelog records were not all acknowledged in 60 s")
    print(f"bench serve: {written} changelog records written", file=sys.stderr)
    nexts: dict[str, dict[str, Any]] = {}
    for event in world.generate(options.cards * 3):
        if event.record["card_id"] in histories.histories:
            nexts.setdefault(event.record["card_id"], event.record)
    return list(nexts.values())


@contextmanager
def _server(
    settings: Settings, model_path: Path, group: str, workers: int, log: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMER_")}
    env.update(
        STREAMER_BOOTSTRAP_SERVERS=settings.bootstrap_servers,
        STREAMER_GROUP_ID=group,
        STREAMER_MODEL_PATH=str(model_path),
        STREAMER_HTTP_PORT=str(port),
        STREAMER_LOG_FORMAT="json",
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamer", "serve", "--workers", str(workers)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            yield f"http://127.0.0.1:{port}", process
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                print("bench serve: the server did not stop in 60 s; killed", file=sys.stderr)
                process.kill()
                process.wait()


def _measure(
    settings: Settings,
    options: ServeBenchOptions,
    model_path: Path,
    group: str,
    workers: int,
    requests: list[dict[str, Any]],
    targets: Path,
    vegeta: str,
) -> WorkersResult:
    log = targets.parent / f"serve-{workers}.log"
    with _server(settings, model_path, group, workers, log) as (url, process):
        _wait_ready(url, process, log, workers)
        caught = [
            json.loads(line)
            for line in log.read_text().splitlines()
            if '"changelog replica caught up"' in line
        ]
        result = WorkersResult(
            workers,
            int(caught[0]["records"]),
            float(caught[0]["seconds"]),
            float(caught[0]["records_per_second"]),
        )
        with targets.open("w") as out:
            for record in requests:
                body = base64.b64encode(json.dumps(record).encode()).decode()
                target = {
                    "method": "POST",
                    "url": f"{url}/v1/score",
                    "body": body,
                    "header": {"Content-Type": ["application/json"]},
                }
                out.write(json.dumps(target) + "\n")
        for rate in options.rates:
            _attack(vegeta, targets, rate, options.warmup_seconds)
            report = _attack(vegeta, targets, rate, options.seconds)
            latencies = report["latencies"]
            result.rates.append(
                RateResult(
                    rate,
                    latencies["50th"] / 1e6,
                    latencies["99th"] / 1e6,
                    latencies["max"] / 1e6,
                    report["success"],
                    report["requests"],
                )
            )
            print(f"bench serve: {workers} worker(s): {result.rates[-1]}", file=sys.stderr)
        rate_batch, p50 = _batches(url, requests, workers, options.batch_seconds, settings)
        result.batch_transactions_per_second = rate_batch
        result.batch_p50_ms = p50
    return result


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, workers: int) -> None:
    """Until every worker has caught up (each logs it) and /readyz answers 200."""
    deadline = time.monotonic() + READY_TIMEOUT
    with httpx2.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"bench serve: the server exited:\n{log.read_text()[-3000:]}")
            caught = log.read_text().count('"changelog replica caught up"')
            try:
                ready = client.get(f"{url}/readyz").status_code == 200
            except httpx2.TransportError:
                ready = False
            if ready and caught >= workers:
                return
            time.sleep(0.5)
    raise SystemExit(f"bench serve: not ready in {READY_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def _attack(vegeta: str, targets: Path, rate: float, seconds: float) -> dict[str, Any]:
    attack = subprocess.Popen(
        [
            vegeta,
            "attack",
            "-format=json",
            f"-targets={targets}",
            f"-rate={rate:g}/s",
            f"-duration={seconds:g}s",
            "-max-body=0",
            "-timeout=5s",
        ],
        stdout=subprocess.PIPE,
    )
    report = subprocess.run(
        [vegeta, "report", "-type=json"], stdin=attack.stdout, capture_output=True, check=True
    )
    attack.wait()
    parsed: dict[str, Any] = json.loads(report.stdout)
    return parsed


def _batches(
    url: str,
    requests: Sequence[dict[str, Any]],
    clients: int,
    seconds: float,
    settings: Settings,
) -> tuple[float, float]:
    """Full batches back to back from `clients` threads: (transactions/s, p50 batch ms)."""
    size = settings.http_max_batch
    bodies = [
        json.dumps({"transactions": list(requests[i : i + size])}).encode()
        for i in range(0, len(requests) - size + 1, size)
    ]
    durations: list[float] = []
    scored = [0] * clients
    stop_at = time.monotonic() + seconds

    errors: list[str] = []

    def client_loop(index: int) -> None:
        try:
            send(index)
        except Exception as exc:  # reported below: a thread's exception would go unseen
            errors.append(repr(exc))

    def send(index: int) -> None:
        with httpx2.Client(timeout=60) as client:
            turn = index
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                response = client.post(
                    f"{url}/v1/score/batch",
                    content=bodies[turn % len(bodies)],
                    headers={"Content-Type": "application/json"},
                )
                durations.append(time.perf_counter() - started)
                response.raise_for_status()
                scored[index] += response.json()["scored"]
                turn += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    if errors or not durations:
        raise SystemExit(f"bench serve: batches failed: {errors or 'no batch to send'}")
    durations.sort()
    return sum(scored) / elapsed, durations[len(durations) // 2] * 1000


def _table(results: list[WorkersResult], options: ServeBenchOptions) -> str:
    lines = [
        "| workers | replica catch-up | "
        + " | ".join(f"/v1/score at {r:g}/s p50 / p99 (ok)" for r in options.rates)
        + " | highest rate tried with p99 <= 20 ms | batch of "
        + "1,000: transactions/s (p50 per batch) |",
        "|---|---|" + "---|" * len(options.rates) + "---|---|",
    ]
    for result in results:
        cells = [
            f"{rate.p50_ms:.1f} / {rate.p99_ms:.1f} ms ({rate.success:.0%})"
            for rate in result.rates
        ]
        best = result.best_rate
        lines.append(
            f"| {result.workers} | {result.catch_up_records:,} records in "
            f"{result.catch_up_seconds:.1f} s ({result.catch_up_records_per_second:,.0f}/s) | "
            + " | ".join(cells)
            + f" | {'none' if best is None else f'{best:g}/s'} | "
            f"{result.batch_transactions_per_second:,.0f} ({result.batch_p50_ms:.0f} ms) |"
        )
    return "\n".join(lines) + "\n"
