"""`python -m streamer.tools.bench run|passthrough`: the bench, and the limit it measures against.

`run` needs a broker (`--bootstrap-servers` or `STREAMER_BOOTSTRAP_SERVERS`) and a trained model;
`scripts/bench` provides both. Exit status: 0 done (whatever the targets say), 1 the run failed,
2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import structlog
from confluent_kafka import KafkaException

from streamer.cli import (
    EXIT_FAILURE,
    EXIT_USAGE,
    non_negative_float,
    positive_float,
    positive_int,
    tune_garbage_collector,
)
from streamer.errors import ConfigError, StreamerError
from streamer.logging import configure_logging
from streamer.settings import load_settings
from streamer.tools.bench import QUICK, BenchOptions


def parse_rates(text: str) -> tuple[float, ...]:
    """`1000,5000,20000` → (1000.0, 5000.0, 20000.0); each rate a positive number."""
    rates = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {part.strip()!r}") from None
        if not 0 < rate < float("inf"):
            raise argparse.ArgumentTypeError(f"a rate must be > 0 events/s, got {part.strip()}")
        rates.append(rate)
    return tuple(rates)


def parse_workers(text: str) -> tuple[int, ...]:
    """`1,2` → (1, 2); each at least 1."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError(f"worker counts must be at least 1, got {text}")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamer.tools.bench",
        description="Measure the scorer against a raw Kafka pass-through on a real broker.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="the whole bench: table on stdout, files on disk")
    run.add_argument("--bootstrap-servers", help="Kafka bootstrap servers")
    run.add_argument("--model-path", type=Path, help="model artefact (default: the settings')")
    run.add_argument("--quick", action="store_true", help="a short run for development")
    run.add_argument("--events", type=positive_int, help="preloaded events (default 500,000)")
    run.add_argument("--partitions", type=positive_int, help="input partitions (default 4)")
    run.add_argument(
        "--throughput-repeats", type=positive_int, help="drains per run, median shown (default 3)"
    )
    run.add_argument(
        "--rates", type=parse_rates, help="paced rates, events/s (default 1000,5000,20000)"
    )
    run.add_argument(
        "--latency-seconds", type=positive_float, help="measured s per processor and rate"
    )
    run.add_argument(
        "--latency-rounds", type=positive_int, help="alternating rounds the seconds are split into"
    )
    run.add_argument("--warmup-seconds", type=non_negative_float, help="unmeasured s per round")
    run.add_argument("--breakdown-records", type=positive_int, help="records timed per stage")
    run.add_argument(
        "--state-cards", type=positive_int, help="cards of the state memory run (default 1,000,000)"
    )
    run.add_argument("--out-dir", type=Path, help="results folder (default bench-results)")
    run.add_argument("--kafka-version", help="broker version, for the report")

    serve = commands.add_parser("serve", help="streamer serve under load (needs vegeta)")
    serve.add_argument("--bootstrap-servers", help="Kafka bootstrap servers")
    serve.add_argument("--model-path", type=Path, help="model artefact (default: the settings')")
    serve.add_argument("--rates", type=parse_rates, help="/v1/score rates, requests/s")
    serve.add_argument("--seconds", type=positive_float, help="measured seconds per rate")
    serve.add_argument(
        "--workers", type=parse_workers, help="worker process counts to measure (default 1,2)"
    )
    serve.add_argument("--cards", type=positive_int, help="cards with history (default 20,000)")
    serve.add_argument(
        "--history-events", type=positive_int, help="events behind the histories (default 200,000)"
    )
    serve.add_argument("--vegeta", help="the vegeta binary (default: on PATH or in ~/go/bin)")
    serve.add_argument("--out-dir", type=Path, help="results folder (default bench-results)")

    passthrough = commands.add_parser("passthrough", help="the limit: forward records untouched")
    passthrough.add_argument("--bootstrap-servers")
    passthrough.add_argument("--input-topic")
    passthrough.add_argument("--output-topic")
    passthrough.add_argument("--dlq-topic", help="accepted for symmetry with `streamer run`")
    passthrough.add_argument("--group-id")
    passthrough.add_argument("--log-format", choices=["console", "json"])
    passthrough.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    passthrough.add_argument("--until-idle", type=non_negative_float, metavar="SECONDS")
    return parser


def options_from(args: argparse.Namespace) -> BenchOptions:
    """Bench sizes: the full defaults or `--quick`, then each flag given."""
    options = QUICK if args.quick else BenchOptions()
    flags = {
        "events": args.events,
        "partitions": args.partitions,
        "throughput_repeats": args.throughput_repeats,
        "rates": args.rates,
        "latency_seconds": args.latency_seconds,
        "latency_rounds": args.latency_rounds,
        "warmup_seconds": args.warmup_seconds,
        "breakdown_records": args.breakdown_records,
        "state_cards": args.state_cards,
        "out_root": args.out_dir,
        "kafka_version": args.kafka_version,
    }
    return replace(options, **{name: value for name, value in flags.items() if value is not None})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "passthrough":
            return _passthrough(args)
        if args.command == "serve":
            return _serve(args)
        # SIGTERM (scripts/bench passes its signals on) unwinds like Ctrl-C: the processors
        # are stopped and the topics deleted on the way out.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        # Imported here: the pass-through process needs none of it (numpy, the model, matplotlib).
        from streamer.tools.bench.harness import run_bench

        settings = load_settings(bootstrap_servers=args.bootstrap_servers)
        # The bench's own Kafka clients log through structlog; only their warnings matter here.
        configure_logging(settings.log_format, "warning")
        model_path = args.model_path or settings.model_path
        written = run_bench(settings, options_from(args), model_path)
    except ConfigError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StreamerError, KafkaException) as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    print(written.table, end="")
    print(f"bench: results in {written.directory}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from streamer.tools.bench.serve import ServeBenchOptions, run_serve_bench

    settings = load_settings(bootstrap_servers=args.bootstrap_servers)
    configure_logging(settings.log_format, "warning")
    flags = {
        "rates": args.rates,
        "seconds": args.seconds,
        "workers": args.workers,
        "cards": args.cards,
        "history_events": args.history_events,
        "vegeta": args.vegeta,
        "out_dir": args.out_dir,
    }
    options = ServeBenchOptions(**{name: value for name, value in flags.items() if value})
    print(run_serve_bench(settings, options, args.model_path or settings.model_path), end="")
    return 0


def _passthrough(args: argparse.Namespace) -> int:
    from streamer.tools.bench.passthrough import PassThrough

    settings = load_settings(
        bootstrap_servers=args.bootstrap_servers,
        input_topic=args.input_topic,
        output_topic=args.output_topic,
        dlq_topic=args.dlq_topic,
        group_id=args.group_id,
        log_format=args.log_format,
        log_level=args.log_level,
    )
    configure_logging(settings.log_format, settings.log_level)
    log_ = structlog.get_logger("streamer.tools.bench.passthrough")
    log_.info(
        "pass-through starting",
        input_topic=settings.input_topic,
        output_topic=settings.output_topic,
        group_id=settings.group_id,
    )
    passthrough = PassThrough(settings)
    passthrough.install_signal_handlers()
    tune_garbage_collector()  # as `streamer run` does
    try:
        passthrough.run(until_idle=args.until_idle)
    except (StreamerError, KafkaException) as exc:
        log_.error("stopped", error=str(exc), error_class=type(exc).__name__)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
