"""The `streamer` command: parse flags, build Settings once, call one function per command.

Exit status: 0 success, 1 a runtime failure (no broker answering, Kafka, delivery) or what
`streamer audit` reports as a failure, 2 bad usage, configuration (a missing topic included) or
data file, 3 a refused model, 130 interrupted (Ctrl-C).

Every command that talks to Kafka checks, in this order and before anything else (the model
included): that librdkafka accepts the `STREAMER_KAFKA_*` settings, that a broker answers within
`STREAMER_CONNECT_TIMEOUT`, and that the topics it needs exist.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from confluent_kafka import KafkaException

from streamer import __version__
from streamer.errors import (
    ConfigError,
    DataFileError,
    MissingTopicError,
    ModelRefusedError,
    StreamerError,
)
from streamer.logging import configure_logging
from streamer.settings import Settings, load_settings, unknown_variables

log = structlog.get_logger("streamer.cli")

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_MODEL_REFUSED = 3
EXIT_INTERRUPTED = 130
KAFKA_COMMANDS = frozenset({"run", "produce", "tail", "topics", "demo", "audit", "dlq", "serve"})
"""Commands that talk to Kafka: their client settings are checked before they start."""
YOUNG_COLLECTION_THRESHOLD = 20_000
"""Net allocations between two collections of the youngest generation in `streamer run`
(Python's default: 700)."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def tune_garbage_collector() -> None:
    """Keep the garbage collector off the hot loop's back; call it once, right before the loop.

    What start-up built (modules, the model, the clients) lives as long as the process, yet every
    full collection would walk it all: with scikit-learn loaded over 100,000 objects, a pause of
    about 100 ms every few tens of thousands of records. It is frozen, so collections skip it.
    And the youngest generation is collected after 20,000 net allocations rather than 700: a
    batch holds tens of thousands of tuples and lists for a moment (decoded records, columns),
    which at 700 were walked by several collections per batch, about 1 µs per record, though
    they die with the batch. The loop makes few reference cycles, so little waits longer.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _timestamp_ms(text: str) -> int:
    """A time given as ISO-8601 (UTC unless it has an offset) or as epoch milliseconds → ms."""
    text = text.strip()
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO-8601 time (2024-05-01T12:00:00Z) or epoch milliseconds: {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


_TIME_HELP = "ISO-8601 (UTC unless an offset is given) or epoch milliseconds"


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (overrides STREAMER_* variables)")
    group.add_argument("--bootstrap-servers", help="Kafka bootstrap servers")
    group.add_argument("--input-topic", help="transaction events in")
    group.add_argument("--output-topic", help="verdicts out")
    group.add_argument("--dlq-topic", help="dead letters")
    group.add_argument("--log-format", choices=["console", "json"])
    group.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamer",
        description="Kafka card transactions in, fraud verdicts out.",
    )
    parser.add_argument("--version", action="version", version=f"streamer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="consume, score and publish until stopped")
    _add_common(run)
    run.add_argument("--group-id", help="consumer group")
    run.add_argument("--model-path", type=Path, help="model artefact")
    run.add_argument("--threshold", type=float, help="score at or above which is_fraud is true")
    run.add_argument("--processing-guarantee", choices=["at-least-once", "exactly-once"])
    run.add_argument("--batch-size", type=positive_int, help="most records per poll")
    run.add_argument(
        "--until-idle",
        type=non_negative_float,
        metavar="SECONDS",
        help="exit 0 after this long with nothing to consume",
    )
    run.add_argument(
        "--allow-auto-create",
        action="store_true",
        help="let the broker create missing input, output and dead-letter topics (its "
        "auto.create.topics.enable, with its default settings) instead of exiting 2",
    )

    serve = commands.add_parser(
        "serve", help="score transactions over HTTP with the stream's model and card histories"
    )
    _add_common(serve)
    serve.add_argument("--group-id", help="the scorers' consumer group (whose state to follow)")
    serve.add_argument("--model-path", type=Path, help="model artefact")
    serve.add_argument("--threshold", type=float, help="score at or above which is_fraud is true")
    serve.add_argument("--host", dest="http_host", help="address to listen on")
    serve.add_argument("--port", dest="http_port", type=positive_int, help="TCP port")
    serve.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="server processes, each with its own model and card history replica (default 1)",
    )

    train = commands.add_parser("train", help="fit the model and write its artefact and card")
    train.add_argument("--model-path", type=Path, help="where to write the artefact")
    train.add_argument("--seed", type=int, default=None, help="training data seed (default 7)")
    train.add_argument("--size", type=positive_int, default=None, help="training set size")
    train.add_argument("--if-missing", action="store_true", help="do nothing if a model exists")
    train.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help="train on this labelled history (.parquet, .csv or .avro) instead of the synthetic "
        "world: the fields of transaction.avsc plus the label column",
    )
    train.add_argument(
        "--label-column",
        default="is_fraud",
        metavar="NAME",
        help="with --data: the label column, 0/1 or false/true (default is_fraud)",
    )
    train.add_argument("--log-format", choices=["console", "json"])
    train.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    score = commands.add_parser(
        "score",
        help="score a Parquet or CSV file of transactions into a file of verdicts",
        description=(
            "Score every row of a file with the stream's pipeline and model: rows are applied "
            "in event-time order (ties in file order), each with its card's history before it. "
            "The output (.parquet or .csv) has the verdict fields and the input's "
            "transaction_id. A row that cannot be read, breaks a rule or cannot be scored goes "
            "to --rejects with its columns, row_number, error_stage, error_reason and "
            "error_class; without --rejects such a row stops the job and nothing is written."
        ),
        epilog="exit status: 0 scored; 2 bad usage, an unreadable file, or a rejected row "
        "without --rejects; 3 a refused model",
    )
    score.add_argument("--input", type=Path, required=True, metavar="PATH")
    score.add_argument("--output", type=Path, required=True, metavar="PATH")
    score.add_argument("--rejects", type=Path, metavar="PATH")
    score.add_argument("--model-path", type=Path, help="model artefact")
    score.add_argument("--threshold", type=float, help="score at or above which is_fraud is true")
    score.add_argument("--log-format", choices=["console", "json"])
    score.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    features = commands.add_parser(
        "features",
        help="write the feature matrix the scorer builds for a file of transactions",
        description=(
            "Write transaction_id, event_time, the model's feature columns (in order) and the "
            "label when the file has it, one row per input row in event-time order, built by "
            "the scorer's own code. Every row must be valid."
        ),
        epilog="exit status: 0 written; 2 bad usage or a bad data file",
    )
    features.add_argument("--data", type=Path, required=True, metavar="PATH")
    features.add_argument("--output", type=Path, required=True, metavar="PATH")
    features.add_argument(
        "--label-column",
        default="is_fraud",
        metavar="NAME",
        help="copied to the output when present (default is_fraud)",
    )
    features.add_argument("--log-format", choices=["console", "json"])
    features.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    model = commands.add_parser("model", help="bring your own model")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    model_import = model_commands.add_parser(
        "import",
        help="wrap a fitted scikit-learn classifier as a verified artefact and model card",
        description=(
            "Check a scikit-learn classifier fitted on the feature matrix (`streamer features`"
            " columns, in that order) and write it as the skops artefact and model card that"
            " `streamer run` loads. PATH is a skops file, or a pickle or joblib file: a pickle is"
            " unpickled here, which runs code the file names, so import only files you trust"
            " (`streamer run` never loads a pickle). Supported: HistGradientBoostingClassifier,"
            " RandomForestClassifier, ExtraTreesClassifier, LogisticRegression, alone or last in"
            " a Pipeline of standard preprocessing (SimpleImputer, scalers, OneHotEncoder in a"
            " ColumnTransformer). The features hold NaN for missing values: a classifier that"
            " cannot take NaN needs a SimpleImputer before it."
        ),
        epilog="exit status: 0 written; 2 bad usage or data file; 3 the model is refused",
    )
    model_import.add_argument("path", type=Path, metavar="PATH", help="the fitted model file")
    model_import.add_argument(
        "--threshold",
        type=float,
        dest="import_threshold",  # not STREAMER_THRESHOLD: the card's, checked by the import
        help="score at or above which is_fraud is true (required without --data)",
    )
    model_import.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help="labelled transactions (.parquet, .csv or .avro): the threshold maximising F1 on"
        " it (unless --threshold is given) and the card's metrics",
    )
    model_import.add_argument(
        "--label-column", default="is_fraud", help="label column of --data (default is_fraud)"
    )
    model_import.add_argument("--name", help="model name on the card and verdicts")
    model_import.add_argument("--model-path", type=Path, help="where to write the artefact")
    model_import.add_argument("--log-format", choices=["console", "json"])
    model_import.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    produce = commands.add_parser("produce", help="publish synthetic transactions")
    _add_common(produce)
    produce.add_argument("--count", type=positive_int, default=10_000)
    produce.add_argument(
        "--rate", type=non_negative_float, default=0.0, help="events/s (0: as fast as possible)"
    )
    produce.add_argument(
        "--seed",
        type=int,
        default=None,
        help="the synthetic world, its card ids included (card-<seed>-<n>); default: random",
    )
    produce.add_argument(
        "--allow-auto-create",
        action="store_true",
        help="let the broker create a missing input topic instead of exiting 2",
    )

    tail = commands.add_parser("tail", help="print verdicts as they arrive")
    _add_common(tail)
    tail.add_argument("--count", type=positive_int, help="stop after this many")
    tail.add_argument("--from-beginning", action="store_true")
    tail.add_argument("--format", choices=["json", "table"], default="table", dest="output_format")

    topics = commands.add_parser("topics", help="manage the topics")
    topic_commands = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    create = topic_commands.add_parser(
        "create", help="create input, output and DLQ (and shadow) topics if missing"
    )
    _add_common(create)
    create.add_argument("--partitions", type=positive_int, default=3)
    create.add_argument("--replication-factor", type=int, default=-1)

    demo = commands.add_parser(
        "demo", help="train if needed, stream synthetic events through a scorer, print a summary"
    )
    _add_common(demo)
    demo.add_argument("--count", type=positive_int, default=20_000, help="events in the burst")
    demo.add_argument(
        "--latency-rate", type=non_negative_float, default=2_000.0, help="events/s when pacing"
    )
    demo.add_argument("--latency-count", type=positive_int, default=6_000)
    demo.add_argument("--model-path", type=Path)

    audit = commands.add_parser(
        "audit",
        help="reconcile the input topic with its verdicts and dead letters",
        description=(
            "Read the input topic, the verdict topic and the dead-letter topic (read committed) up "
            "to their end offsets at the start, and check that every input record has exactly "
            "one output, by the streamer.source.* headers. Reports inputs, verdicts, dead "
            "letters, missing inputs (no output), duplicates (more than one output, and the extra "
            "outputs), orphans (outputs naming no input record) and outputs outside the audited "
            "range, per partition, with sample offsets."
        ),
        epilog=(
            "exit status: 0 clean; 1 an input has no output, or has several and "
            "--expect exactly-once is given, or a topic could not be read to its end in time; "
            "2 bad usage or configuration"
        ),
    )
    _add_common(audit)
    audit.add_argument(
        "--since",
        type=_timestamp_ms,
        metavar="TIME",
        help=f"audit input records from the first one at or after TIME ({_TIME_HELP})",
    )
    audit.add_argument(
        "--until",
        type=_timestamp_ms,
        metavar="TIME",
        help="audit input records before the first one at or after TIME",
    )
    audit.add_argument(
        "--expect",
        choices=["at-least-once", "exactly-once"],
        default="at-least-once",
        help="exactly-once also fails on duplicates (default: at-least-once)",
    )
    audit.add_argument("--json", action="store_true", help="print one JSON object")
    audit.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="give up on a partition that makes no progress for this long, e.g. held back by "
        "an open transaction (default 30)",
    )

    dlq = commands.add_parser("dlq", help="work with the dead-letter topic")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    replay = dlq_commands.add_parser(
        "replay",
        help="re-publish dead letters to the input topic",
        description=(
            "Re-publish dead letters to the input topic with their original key and value "
            "bytes, so that a fixed upstream or a new model processes them again. Each replay "
            "carries streamer.replay.of (<dlq topic>/<partition>/<offset>), "
            "streamer.replay.source (the original input record) and the dead letter's stage and "
            "reason as streamer.replay.stage and streamer.replay.reason. The dead-letter topic is "
            "read (read committed) up to its end offsets at the start, partition after "
            "partition, oldest first. Prints how many were replayed per stage."
        ),
        epilog=(
            "exit status: 0 every replay acknowledged by the broker; 1 a replay was not "
            "(each is named on stderr); 2 bad usage or configuration"
        ),
    )
    _add_common(replay)
    replay.add_argument(
        "--stage",
        action="append",
        choices=["decode", "validate", "score"],
        help="only dead letters of this stage (repeatable; default: every stage)",
    )
    replay.add_argument(
        "--since",
        type=_timestamp_ms,
        metavar="TIME",
        help=f"only dead letters written at or after TIME ({_TIME_HELP})",
    )
    replay.add_argument(
        "--until", type=_timestamp_ms, metavar="TIME", help="only dead letters written before TIME"
    )
    replay.add_argument(
        "--partition", type=_non_negative_int, help="only this partition of the dead-letter topic"
    )
    replay.add_argument(
        "--from-offset",
        type=_non_negative_int,
        metavar="OFFSET",
        help="with --partition: first offset (inclusive)",
    )
    replay.add_argument(
        "--to-offset",
        type=_non_negative_int,
        metavar="OFFSET",
        help="with --partition: last offset (inclusive)",
    )
    replay.add_argument("--limit", type=positive_int, help="replay at most this many")
    replay.add_argument(
        "--dry-run", action="store_true", help="print what would be replayed; send nothing"
    )
    replay.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="give up on a partition that makes no progress for this long (default 30)",
    )
    return parser


_SETTING_FLAGS = (
    "bootstrap_servers",
    "input_topic",
    "output_topic",
    "dlq_topic",
    "log_format",
    "log_level",
    "group_id",
    "model_path",
    "threshold",
    "processing_guarantee",
    "batch_size",
    "http_host",
    "http_port",
)


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name, None) for name in _SETTING_FLAGS}
    return load_settings(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_from(args)
    except ConfigError as exc:
        # Logging is not configured yet (its own settings may be the bad ones): plain stderr.
        print(f"streamer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_format, settings.log_level)
    for name, close in unknown_variables():
        hint = {"did_you_mean": close} if close else {}
        log.warning("unknown variable, ignored", variable=name, **hint)
    handler = _COMMANDS[args.command]
    try:
        if args.command in KAFKA_COMMANDS:
            from streamer.kafka.clients import check_client_config

            check_client_config(settings)
        return handler(settings, args)
    except MissingTopicError as exc:
        log.error("missing topic", error=str(exc))
        return EXIT_USAGE
    except ConfigError as exc:
        log.error("invalid configuration", error=str(exc))
        return EXIT_USAGE
    except DataFileError as exc:
        log.error("bad data file", error=str(exc))
        return EXIT_USAGE
    except ModelRefusedError as exc:
        log.error("model refused", error=str(exc))
        return EXIT_MODEL_REFUSED
    except StreamerError as exc:
        log.error("stopped", error=str(exc), error_class=type(exc).__name__)
        return EXIT_FAILURE
    except KafkaException as exc:
        log.error("kafka error", error=str(exc.args[0] if exc.args else exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _connect(
    settings: Settings,
    topics: dict[str, str] | None = None,
    *,
    allow_auto_create: bool | None = None,
) -> None:
    """Wait up to the connect timeout for a broker; then check `topics` (name → what names it).

    Raises `BrokerUnreachableError` (exit 1) or `MissingTopicError` (exit 2).
    """
    from streamer.kafka.admin import check_brokers, require_topics

    metadata = check_brokers(settings.admin_config(), settings.connect_timeout)
    if topics:
        created = require_topics(
            settings.admin_config(),
            metadata,
            topics,
            allow_auto_create=allow_auto_create,
            timeout=settings.connect_timeout,
        )
        if created:
            log.info("topics created by the broker", topics=created)


def _input_topic(settings: Settings) -> dict[str, str]:
    return {settings.input_topic: "the input: STREAMER_INPUT_TOPIC or --input-topic"}


def _output_topic(settings: Settings) -> dict[str, str]:
    return {settings.output_topic: "the verdicts: STREAMER_OUTPUT_TOPIC or --output-topic"}


def _dlq_topic(settings: Settings) -> dict[str, str]:
    return {settings.dlq_topic: "the dead letters: STREAMER_DLQ_TOPIC or --dlq-topic"}


def _shadow_topic(settings: Settings) -> dict[str, str]:
    """The challenger's verdicts, when a challenger is configured (else nothing to check)."""
    if settings.shadow_model_path is None:
        return {}
    return {
        settings.shadow_topic: "the challenger's verdicts: STREAMER_SHADOW_TOPIC, written "
        "because STREAMER_SHADOW_MODEL_PATH is set"
    }


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from streamer.metrics import HealthServer, ScorerMetrics

    metrics: ScorerMetrics | None = None
    server: HealthServer | None = None
    if settings.metrics_port:
        # Bound first, before the brokers are asked anything: a port in use stops the scorer at
        # once (exit 2); until the scorer exists, /readyz answers "starting".
        metrics = ScorerMetrics(settings.group_id)
        server = HealthServer(settings.metrics_host, settings.metrics_port, metrics.registry)
        server.start()
        log.info("serving metrics", url=f"http://{settings.metrics_host}:{server.port}/metrics")
    try:
        _connect(
            settings,
            {
                **_input_topic(settings),
                **_output_topic(settings),
                **_dlq_topic(settings),
                **_shadow_topic(settings),
            },
            allow_auto_create=args.allow_auto_create,
        )
        from streamer.app import ScoringApp
        from streamer.model.scorer import Scorer

        # The model is loaded and verified before the scorer's clients exist: a refused model
        # consumes nothing and commits nothing.
        scorer = Scorer.from_path(settings.model_path, settings.threshold)
        log.info(
            "scorer starting",
            config=settings.loggable(),
            **scorer.log_fields(),
        )
        app = ScoringApp.create(settings, scorer, metrics)
        if metrics is not None and server is not None:
            metrics.observe(app)
            server.watch(app)
        app.install_signal_handlers()
        tune_garbage_collector()
        app.run(until_idle=args.until_idle)
    finally:
        if server is not None:
            server.close()
    return 0


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from streamer.serve.server import serve

    overrides = {name: getattr(args, name, None) for name in _SETTING_FLAGS}
    serve(settings, workers=args.workers, overrides=overrides)
    return 0


def _train(settings: Settings, args: argparse.Namespace) -> int:
    from streamer.model.train import (
        DEFAULT_SEED,
        DEFAULT_TRAINING_SIZE,
        train_from_file,
        train_model,
    )

    path: Path = settings.model_path
    if args.if_missing and path.exists():
        log.info("model exists, not training", model_path=str(path))
        return 0
    if args.data is not None:
        if args.seed is not None or args.size is not None:
            raise ConfigError("--seed and --size choose synthetic data; leave them out with --data")
        card = train_from_file(
            path,
            args.data,
            label_column=args.label_column,
            progress_interval=settings.progress_interval,
        )
    else:
        card = train_model(
            path,
            seed=DEFAULT_SEED if args.seed is None else args.seed,
            size=args.size or DEFAULT_TRAINING_SIZE,
            progress_interval=settings.progress_interval,
        )
    print(f"wrote {path} ({card.name} {card.version}, threshold {card.threshold:.4f})")
    width = max((len(name) for name in card.metrics), default=0)
    for name, value in card.metrics.items():
        print(f"  {name:<{width}} {value:.4f}")
    return 0


def _score(settings: Settings, args: argparse.Namespace) -> int:
    from streamer.model.scorer import Scorer
    from streamer.tools.batch import score_file

    scorer = Scorer.from_path(settings.model_path, settings.threshold)
    report = score_file(
        args.input,
        args.output,
        scorer,
        rejects_path=args.rejects,
        max_event_bytes=settings.max_event_bytes,
    )
    print(
        f"scored {report.scored:,} of {report.rows:,} rows into {args.output}"
        f" ({report.flagged:,} flagged, {scorer.name} {scorer.version})"
        + (f"; {report.rejected:,} rejected into {args.rejects}" if args.rejects else "")
    )
    return 0


def _features(settings: Settings, args: argparse.Namespace) -> int:
    from streamer.tools.batch import write_features

    count = write_features(args.data, args.output, label_column=args.label_column)
    print(f"wrote {count:,} rows of features to {args.output}")
    return 0


def _model(settings: Settings, args: argparse.Namespace) -> int:
    from streamer.model.importer import import_model

    path: Path = settings.model_path
    result = import_model(
        args.path,
        path,
        threshold=args.import_threshold,
        data=args.data,
        label_column=args.label_column,
        name=args.name,
    )
    card = result.card
    print(
        f"wrote {path} ({card.name} {card.version}, {card.training['model']},"
        f" threshold {card.threshold:.4f}: {card.training['threshold_rule']})"
    )
    width = max((len(name) for name in card.metrics), default=0)
    for name, value in card.metrics.items():
        print(f"  {name:<{width}} {value:.4f}")
    for change in card.training["changes"]:
        print(f"  changed: {change}")
    for warning in result.warnings:
        print(f"  warning: {warning}")
    return 0


def _produce(settings: Settings, args: argparse.Namespace) -> int:
    import secrets

    _connect(settings, _input_topic(settings), allow_auto_create=args.allow_auto_create)
    from streamer.tools.produce import produce_synthetic

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    produce_synthetic(settings, count=args.count, rate=args.rate or None, seed=seed)
    return 0


def _tail(settings: Settings, args: argparse.Namespace) -> int:
    _connect(settings, _output_topic(settings))
    from streamer.tools.tail import tail

    tail(
        settings,
        count=args.count,
        from_beginning=args.from_beginning,
        output_format=args.output_format,
    )
    return 0


def _topics(settings: Settings, args: argparse.Namespace) -> int:
    _connect(settings)
    from streamer.app import CARD_STORE
    from streamer.kafka.admin import ensure_topics
    from streamer.kafka.changelog import changelog_topic, ensure_changelog

    results = ensure_topics(
        settings.admin_config(),
        [settings.input_topic, settings.output_topic, settings.dlq_topic]
        + ([settings.shadow_topic] if settings.shadow_model_path is not None else []),
        partitions=args.partitions,
        replication_factor=args.replication_factor,
    )
    for result in results:
        print(f"{result.name}: {'created' if result.created else 'exists'}")
    # The card state's changelog, partitioned like the input (whatever --partitions says).
    changelog = changelog_topic(settings.group_id, CARD_STORE)
    created = ensure_changelog(
        settings.admin_config(),
        changelog,
        settings.input_topic,
        replication_factor=args.replication_factor,
    )
    print(f"{changelog}: {'created' if created else 'exists'}")
    return 0


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    _connect(settings)
    from streamer.tools.demo import run_demo

    return run_demo(
        settings,
        burst_count=args.count,
        latency_rate=args.latency_rate,
        latency_count=args.latency_count,
    )


def _audit(settings: Settings, args: argparse.Namespace) -> int:
    from streamer.tools.audit import check_window, run_audit

    check_window(args.since, args.until)
    _connect(
        settings, {**_input_topic(settings), **_output_topic(settings), **_dlq_topic(settings)}
    )
    return run_audit(
        settings,
        since_ms=args.since,
        until_ms=args.until,
        expect=args.expect,
        timeout=args.timeout,
        as_json=args.json,
        out=sys.stdout,
    )


def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    from streamer.tools.dlq import ReplayFilter, run_replay

    selection = ReplayFilter(
        stages=frozenset(args.stage or ()),
        since_ms=args.since,
        until_ms=args.until,
        partition=args.partition,
        from_offset=args.from_offset,
        to_offset=args.to_offset,
    )
    selection.check()
    needed = (
        _dlq_topic(settings) if args.dry_run else {**_dlq_topic(settings), **_input_topic(settings)}
    )
    _connect(settings, needed)
    return run_replay(
        settings, selection, limit=args.limit, dry_run=args.dry_run, timeout=args.timeout
    )


_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "run": _run,
    "serve": _serve,
    "train": _train,
    "score": _score,
    "features": _features,
    "model": _model,
    "produce": _produce,
    "tail": _tail,
    "topics": _topics,
    "demo": _demo,
    "audit": _audit,
    "dlq": _dlq,
}
