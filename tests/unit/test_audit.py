"""`streamer audit` and `streamer dlq replay` without a broker: header parsing, ranges, counting,
exit status, rendering, the replay filter, and flag errors that stop before Kafka."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from confluent_kafka import KafkaError

from streamer.cli import EXIT_USAGE, _timestamp_ms, build_parser, main
from streamer.headers import (
    ERROR_REASON,
    ERROR_STAGE,
    REPLAY_OF,
    REPLAY_REASON,
    REPLAY_SOURCE,
    REPLAY_STAGE,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
    header_map,
)
from streamer.tools.audit import (
    NO_SOURCE,
    OTHER_TOPIC,
    AuditReport,
    PartitionRange,
    Reconciliation,
    format_summary,
    resolve_range,
    source_of,
)
from streamer.tools.dlq import ReplayFilter, ReplayReport, replay_headers

INPUT = "transactions"
TOPIC = INPUT.encode()
VERDICTS = "fraud-verdicts"
DLQ = "transactions-dlq"


def _headers(partition: object, offset: object, topic: object = TOPIC) -> list[tuple[str, object]]:
    return [(SOURCE_TOPIC, topic), (SOURCE_PARTITION, partition), (SOURCE_OFFSET, offset)]


@dataclass
class Output:
    """Satisfies `HeaderedMessage`: a verdict or dead letter as the reader hands it over."""

    _partition: int
    _offset: int
    _headers: list[tuple[str, object]] | None = field(default_factory=list)

    def topic(self) -> str:
        return VERDICTS

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return None

    def value(self) -> bytes | None:
        return b"v"

    def error(self) -> KafkaError | None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)

    def headers(self) -> list[tuple[str, object]] | None:
        return self._headers


def naming(*sources: tuple[int, int], first_offset: int = 0) -> list[Output]:
    """One output per (input partition, input offset), all in output partition 0."""
    return [
        Output(0, first_offset + i, _headers(str(p).encode(), str(o).encode()))
        for i, (p, o) in enumerate(sources)
    ]


def reconciliation(
    ranges: Sequence[PartitionRange], present: dict[int, Sequence[int]]
) -> Reconciliation:
    """A reconciliation over `ranges` with the input records `present` (partition → offsets)."""
    ends = {r.partition: r.end for r in ranges}
    rec = Reconciliation(INPUT, ranges, ends)
    for partition, offsets in present.items():
        rec.add_inputs(np.full(len(offsets), partition), np.array(offsets))
    return rec


def report_of(rec: Reconciliation) -> AuditReport:
    return rec.report(output_topic=VERDICTS, dlq_topic=DLQ)


class TestSourceHeaders:
    def test_reads_partition_and_offset(self) -> None:
        """The scorer's three headers give (partition, offset)."""
        assert source_of(_headers(b"2", b"1041"), TOPIC) == (2, 1041)

    def test_text_values_are_read_like_bytes(self) -> None:
        """Headers given as text (not as the client returns them) follow the same rules."""
        assert source_of(_headers("2", "7", INPUT), TOPIC) == (2, 7)

    def test_last_value_of_a_repeated_header_wins(self) -> None:
        """As with header_map: a later header of the same name replaces an earlier one."""
        headers = [*_headers(b"0", b"1"), (SOURCE_OFFSET, b"9")]
        assert source_of(headers, TOPIC) == (0, 9)

    def test_other_topic(self) -> None:
        """An output made from another topic is recognised as such."""
        assert source_of(_headers(b"0", b"1", b"payments"), TOPIC) == (OTHER_TOPIC, 0)

    @pytest.mark.parametrize(
        "headers",
        [
            None,
            [],
            [(SOURCE_PARTITION, b"0"), (SOURCE_OFFSET, b"1")],
            [(SOURCE_TOPIC, TOPIC), (SOURCE_OFFSET, b"1")],
            [(SOURCE_TOPIC, TOPIC), (SOURCE_PARTITION, b"0")],
            _headers(b"0", b"-1"),
            _headers(b"0", b"+1"),
            _headers(b"0", b" 1"),
            _headers(b"0", b"1_000"),
            _headers(b"0", b""),
            _headers(b"0", None),
            _headers(b"x", b"1"),
            _headers(b"0", "١٢".encode()),
            _headers("0", "١٢", INPUT),
            _headers(b"0", b"9" * 19),
            _headers(b"0", b"1", None),
        ],
    )
    def test_missing_or_unparsable(self, headers: list[tuple[str, object]] | None) -> None:
        """Anything but plain ASCII decimal numbers and the topic name is no source."""
        assert source_of(headers, TOPIC) == (NO_SOURCE, 0)


class TestRange:
    def test_everything_up_to_the_snapshot_by_default(self) -> None:
        """Without --since/--until the range is [low watermark, high watermark)."""
        assert resolve_range(1, 10, 500) == PartitionRange(1, 10, 500)

    def test_since_and_until_offsets(self) -> None:
        """--since starts at its offset; --until ends before its offset."""
        assert resolve_range(0, 0, 500, 100, 300) == PartitionRange(0, 100, 300)

    def test_no_record_at_or_after_since_is_an_empty_range(self) -> None:
        """offsets_for_times answers -1 when every record is older: nothing to audit."""
        r = resolve_range(0, 0, 500, since_offset=-1)
        assert r.size == 0
        assert r == PartitionRange(0, 500, 500)

    def test_no_record_at_or_after_until_reaches_the_snapshot(self) -> None:
        """--until in the future (-1) ends at the snapshotted end."""
        assert resolve_range(0, 0, 500, until_offset=-1) == PartitionRange(0, 0, 500)

    def test_until_before_since_is_empty(self) -> None:
        """Crossed offsets (non-monotonic timestamps) give an empty range, not a negative one."""
        assert resolve_range(0, 0, 500, 300, 100).size == 0

    def test_never_leaves_the_watermarks(self) -> None:
        """Offsets resolved below the log start or past the snapshot are clamped."""
        assert resolve_range(0, 50, 500, 10, 900) == PartitionRange(0, 50, 500)


class TestCounting:
    def test_one_output_per_input_is_clean(self) -> None:
        """Verdicts and dead letters that name each input once: counts right, nothing flagged."""
        rec = reconciliation(
            [PartitionRange(0, 0, 3), PartitionRange(1, 0, 2)], {0: [0, 1, 2], 1: [0, 1]}
        )
        rec.add_outputs("verdicts", VERDICTS, naming((0, 0), (0, 1), (1, 0)))
        rec.add_outputs("dead_letters", DLQ, naming((0, 2), (1, 1)))
        report = report_of(rec)
        assert (report.inputs, report.verdicts, report.dead_letters) == (5, 3, 2)
        assert (report.missing, report.duplicates, report.orphans) == (0, 0, 0)
        assert report.exit_status("exactly-once") == 0

    def test_dead_letter_headers_count_like_verdict_headers(self) -> None:
        """Source headers among others and in any order (as on a dead letter) are read the same
        as the three headers of a verdict."""
        rec = reconciliation([PartitionRange(0, 0, 2)], {0: [0, 1]})
        letter: list[tuple[str, object]] = [
            (ERROR_STAGE, b"decode"),
            (SOURCE_OFFSET, b"1"),
            (SOURCE_PARTITION, b"0"),
            (SOURCE_TOPIC, TOPIC),
            (ERROR_REASON, b"garbage"),
        ]
        rec.add_outputs("dead_letters", DLQ, [Output(0, 0, letter)])
        rec.add_outputs("verdicts", VERDICTS, naming((0, 0)))
        report = report_of(rec)
        assert (report.verdicts, report.dead_letters, report.missing, report.orphans) == (
            1,
            1,
            0,
            0,
        )

    def test_missing_inputs_are_counted_and_sampled(self) -> None:
        """An input no output names is missing; its offset is among the samples."""
        rec = reconciliation([PartitionRange(0, 0, 3)], {0: [0, 1, 2]})
        rec.add_outputs("verdicts", VERDICTS, naming((0, 0), (0, 2)))
        report = report_of(rec)
        assert report.missing == 1
        assert report.missing_samples == [(0, 1)]

    def test_duplicates_and_extra_outputs(self) -> None:
        """Three outputs for one input: one duplicate, two extra; a verdict plus a dead letter
        for another input is a duplicate too."""
        rec = reconciliation([PartitionRange(0, 0, 2)], {0: [0, 1]})
        rec.add_outputs("verdicts", VERDICTS, naming((0, 0), (0, 0), (0, 0), (0, 1)))
        rec.add_outputs("dead_letters", DLQ, naming((0, 1)))
        report = report_of(rec)
        assert (report.duplicates, report.extra_outputs) == (2, 3)
        assert (report.verdicts, report.dead_letters) == (4, 1)
        assert report.duplicate_samples == [(0, 0, 3), (0, 1, 2)]

    def test_gaps_in_the_input_are_not_inputs(self) -> None:
        """Offsets without a record (a transaction marker, compaction) are neither inputs nor
        missing; an output naming one is an orphan."""
        rec = reconciliation([PartitionRange(0, 0, 5)], {0: [0, 1, 3]})
        rec.add_outputs("verdicts", VERDICTS, naming((0, 0), (0, 1), (0, 2), (0, 3)))
        report = report_of(rec)
        assert (report.inputs, report.verdicts, report.missing) == (3, 3, 0)
        assert report.orphan_reasons["not_a_record"] == 1

    def test_orphans_by_reason_with_where_they_are(self) -> None:
        """Each kind of output naming no input record is counted under its reason."""
        rec = reconciliation([PartitionRange(0, 0, 2)], {0: [0, 1]})
        outputs = [
            Output(0, 10, None),
            Output(0, 11, _headers(b"0", b"x")),
            Output(0, 12, _headers(b"0", b"0", b"payments")),
            Output(1, 13, _headers(b"7", b"0")),
            Output(1, 14, _headers(b"0", b"2")),
            *naming((0, 0), (0, 1), first_offset=15),
        ]
        rec.add_outputs("verdicts", VERDICTS, outputs)
        report = report_of(rec)
        assert report.orphan_reasons == {
            "no_source_headers": 2,
            "other_topic": 1,
            "no_such_partition": 1,
            "not_a_record": 0,
            "past_input_end": 1,
        }
        assert report.orphans == 5
        assert (report.verdicts, report.missing) == (2, 0)
        assert {(o.partition, o.offset, o.reason) for o in report.orphan_samples} == {
            (0, 10, "no_source_headers"),
            (0, 11, "no_source_headers"),
            (0, 12, "other_topic"),
            (1, 13, "no_such_partition"),
            (1, 14, "past_input_end"),
        }

    def test_outputs_for_inputs_outside_the_range_are_not_counted(self) -> None:
        """With a range of [10, 20) of a partition holding [0, 30), outputs naming 5 or 25 are
        outside the range, neither counted nor orphans."""
        rec = Reconciliation(INPUT, [PartitionRange(0, 10, 20)], {0: 30})
        rec.add_inputs(np.zeros(10, dtype=np.int64), np.arange(10, 20))
        rec.add_outputs("verdicts", VERDICTS, naming(*((0, o) for o in range(5, 26))))
        report = report_of(rec)
        assert report.inputs == report.verdicts == 10
        assert report.outside_range == 11
        assert (report.orphans, report.missing) == (0, 0)

    def test_inputs_outside_the_range_are_ignored(self) -> None:
        """Records the reader hands over past the range end do not count as inputs."""
        rec = reconciliation([PartitionRange(0, 0, 2)], {0: [0, 1, 2, 3]})
        assert report_of(rec).inputs == 2

    def test_outputs_past_the_output_snapshot_are_skipped(self) -> None:
        """An output at or past its partition's snapshotted end is not part of the audit."""
        rec = reconciliation([PartitionRange(0, 0, 2)], {0: [0, 1]})
        taken = rec.add_outputs(
            "verdicts", VERDICTS, naming((0, 0), (0, 1), (0, 1)), output_ends=np.array([2])
        )
        report = report_of(rec)
        assert taken == 2
        assert (report.verdicts, report.duplicates) == (2, 0)

    def test_per_partition_breakdown(self) -> None:
        """Each partition's row counts its own inputs and outputs."""
        rec = reconciliation(
            [PartitionRange(0, 0, 2), PartitionRange(1, 5, 8)], {0: [0, 1], 1: [5, 6, 7]}
        )
        rec.add_outputs("verdicts", VERDICTS, naming((0, 0), (0, 0), (1, 5), (1, 6)))
        rows = {row.partition: row for row in report_of(rec).partitions}
        assert (rows[0].inputs, rows[0].verdicts, rows[0].missing, rows[0].duplicates) == (
            2,
            2,
            1,
            1,
        )
        assert (rows[1].start_offset, rows[1].end_offset) == (5, 8)
        assert (rows[1].inputs, rows[1].verdicts, rows[1].missing) == (3, 2, 1)

    def test_an_empty_input_makes_every_output_an_orphan(self) -> None:
        """No input record at all: outputs naming offsets of it are orphans past its end."""
        rec = Reconciliation(INPUT, [PartitionRange(0, 0, 0)], {0: 0})
        rec.add_outputs("verdicts", VERDICTS, naming((0, 0), (0, 5)))
        report = report_of(rec)
        assert (report.inputs, report.verdicts, report.missing) == (0, 0, 0)
        assert report.orphan_reasons["past_input_end"] == 2

    def test_inputs_must_come_first(self) -> None:
        """Presence decides whether an output names a record: inputs after outputs are refused."""
        rec = reconciliation([PartitionRange(0, 0, 2)], {0: [0, 1]})
        rec.add_outputs("verdicts", VERDICTS, naming((0, 0)))
        with pytest.raises(RuntimeError):
            rec.add_inputs(np.array([0]), np.array([1]))


class TestExitStatus:
    def _report(self, missing: int = 0, duplicates: int = 0, orphans: int = 0) -> AuditReport:
        rec = reconciliation([PartitionRange(0, 0, 3)], {0: [0, 1, 2]})
        sources = [(0, 0)] * (1 + duplicates) + [(0, 1)] + ([] if missing else [(0, 2)])
        rec.add_outputs("verdicts", VERDICTS, naming(*sources))
        rec.add_outputs("dead_letters", DLQ, [Output(0, 100 + i, None) for i in range(orphans)])
        return report_of(rec)

    def test_clean_is_0(self) -> None:
        """Nothing missing, nothing duplicated: 0 under both expectations."""
        report = self._report()
        assert report.exit_status("at-least-once") == report.exit_status("exactly-once") == 0

    def test_missing_is_1(self) -> None:
        """A missing input fails under either expectation."""
        report = self._report(missing=1)
        assert report.exit_status("at-least-once") == report.exit_status("exactly-once") == 1

    def test_duplicates_fail_only_exactly_once(self) -> None:
        """Duplicates are allowed by at-least-once, not by exactly-once."""
        report = self._report(duplicates=1)
        assert report.exit_status("at-least-once") == 0
        assert report.exit_status("exactly-once") == 1

    def test_orphans_alone_do_not_fail(self) -> None:
        """Orphans are reported; they lose no input and change no status."""
        report = self._report(orphans=2)
        assert report.orphans == 2
        assert report.exit_status("exactly-once") == 0


class TestRendering:
    def test_json_has_the_counts_and_samples(self) -> None:
        """--json: one object with totals, per-partition rows, samples and the exit status."""
        rec = reconciliation([PartitionRange(0, 0, 3)], {0: [0, 1, 2]})
        rec.add_outputs("verdicts", VERDICTS, naming((0, 0), (0, 0)))
        document = json.loads(json.dumps(report_of(rec).as_dict("exactly-once")))
        assert document["inputs"] == 3
        assert (document["missing"], document["duplicates"], document["extra_outputs"]) == (
            2,
            1,
            1,
        )
        assert document["samples"]["missing"] == [
            {"partition": 0, "offset": 1},
            {"partition": 0, "offset": 2},
        ]
        assert document["samples"]["duplicates"] == [{"partition": 0, "offset": 0, "outputs": 2}]
        assert document["partitions"][0]["missing"] == 2
        assert document["exit_status"] == 1

    def test_summary_names_findings_and_result(self) -> None:
        """The human summary shows the counts, where the findings are and the result."""
        rec = reconciliation([PartitionRange(0, 0, 3)], {0: [0, 1, 2]})
        rec.add_outputs("verdicts", VERDICTS, naming((0, 0), (0, 2)))
        rec.add_outputs("dead_letters", DLQ, [Output(2, 9, None)])
        text = format_summary(report_of(rec), "at-least-once")
        assert "transactions[0]@1" in text
        assert "transactions-dlq[2]@9" in text
        assert "FAILED for at-least-once (missing 1, orphans 1)" in text
        assert "exit status 1" in text

    def test_clean_summary(self) -> None:
        """A clean audit says so."""
        rec = reconciliation([PartitionRange(0, 0, 1)], {0: [0]})
        rec.add_outputs("verdicts", VERDICTS, naming((0, 0)))
        assert "result: clean" in format_summary(report_of(rec), "exactly-once")


class TestReplayFilter:
    def test_everything_by_default(self) -> None:
        """No option: every dead letter, with or without a stage."""
        assert ReplayFilter().matches(0, 5, 1_000, "decode")
        assert ReplayFilter().matches(2, 5, -1, None)

    def test_stages(self) -> None:
        """--stage keeps only the stages asked for; no stage header matches no stage."""
        selection = ReplayFilter(stages=frozenset({"decode", "score"}))
        assert selection.matches(0, 0, 0, "decode")
        assert not selection.matches(0, 0, 0, "validate")
        assert not selection.matches(0, 0, 0, None)

    def test_time_window_is_half_open(self) -> None:
        """--since inclusive, --until exclusive, on the dead letter's timestamp."""
        selection = ReplayFilter(since_ms=1_000, until_ms=2_000)
        assert [selection.matches(0, 0, t, None) for t in (999, 1_000, 1_999, 2_000, -1)] == [
            False,
            True,
            True,
            False,
            False,
        ]

    def test_partition_and_inclusive_offsets(self) -> None:
        """--partition with --from-offset/--to-offset, both inclusive."""
        selection = ReplayFilter(partition=1, from_offset=10, to_offset=12)
        assert [selection.matches(1, o, 0, None) for o in (9, 10, 12, 13)] == [
            False,
            True,
            True,
            False,
        ]
        assert not selection.matches(0, 11, 0, None)

    def test_offsets_to_read(self) -> None:
        """Only the chosen partition is read, from --from-offset through --to-offset."""
        selection = ReplayFilter(partition=1, from_offset=10, to_offset=12)
        assert selection.offsets(0, 0, 100) is None
        assert selection.offsets(1, 0, 100) == PartitionRange(1, 10, 13)
        assert selection.offsets(1, 0, 11) == PartitionRange(1, 10, 11)
        assert selection.offsets(1, 20, 100) == PartitionRange(1, 20, 20)
        assert ReplayFilter().offsets(3, 4, 9) == PartitionRange(3, 4, 9)

    @pytest.mark.parametrize(
        "selection",
        [
            ReplayFilter(from_offset=3),
            ReplayFilter(to_offset=3),
            ReplayFilter(partition=0, from_offset=5, to_offset=4),
            ReplayFilter(since_ms=5, until_ms=5),
            ReplayFilter(stages=frozenset({"serialize"})),
        ],
    )
    def test_contradictions_are_refused(self, selection: ReplayFilter) -> None:
        """Offsets without a partition, crossed bounds, unknown stages: a ConfigError."""
        from streamer.errors import ConfigError

        with pytest.raises(ConfigError):
            selection.check()

    def test_replay_headers(self) -> None:
        """A replay names the dead letter, the original input, and the stage and reason."""
        found = header_map(
            [
                (ERROR_STAGE, b"validate"),
                (ERROR_REASON, b"amount: negative"),
                (SOURCE_TOPIC, TOPIC),
                (SOURCE_PARTITION, b"1"),
                (SOURCE_OFFSET, b"57"),
            ]
        )
        headers = header_map(replay_headers(DLQ, 2, 12, found))
        assert headers == {
            REPLAY_OF: f"{DLQ}/2/12",
            REPLAY_SOURCE: f"{INPUT}/1/57",
            REPLAY_STAGE: "validate",
            REPLAY_REASON: "amount: negative",
        }

    def test_replay_headers_without_source(self) -> None:
        """A dead letter without source headers still gets streamer.replay.of, and no source."""
        headers = header_map(replay_headers(DLQ, 0, 3, {}))
        assert headers == {REPLAY_OF: f"{DLQ}/0/3"}

    def test_summary_per_stage(self) -> None:
        """The summary counts per stage and says when nothing was sent."""
        report = ReplayReport(DLQ, INPUT, dry_run=True, examined=9)
        report.by_stage.update({"validate": 2, "decode": 3})
        text = report.summary()
        assert "would replay 5 of 9 dead letters" in text
        assert "decode 3, validate 2" in text
        assert "dry run" in text


class TestFlags:
    @pytest.fixture(autouse=True)
    def _unreachable_broker(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Nothing here may reach a broker: point at a port nobody listens on.
        monkeypatch.setenv("STREAMER_BOOTSTRAP_SERVERS", "127.0.0.1:1")

    @pytest.mark.parametrize(
        ("text", "ms"),
        [
            ("1767225600000", 1_767_225_600_000),
            ("2026-01-01T00:00:00Z", 1_767_225_600_000),
            ("2026-01-01T00:00:00", 1_767_225_600_000),
            ("2026-01-01T01:00:00.250+01:00", 1_767_225_600_250),
            ("2026-01-01", 1_767_225_600_000),
        ],
    )
    def test_times(self, text: str, ms: int) -> None:
        """ISO-8601 (UTC unless an offset is given) or epoch milliseconds."""
        assert _timestamp_ms(text) == ms

    @pytest.mark.parametrize(
        "argv",
        [
            ["audit", "--since", "yesterday"],
            ["audit", "--expect", "at-most-once"],
            ["audit", "--timeout", "0"],
            ["dlq", "replay", "--stage", "serialize"],
            ["dlq", "replay", "--limit", "0"],
            ["dlq", "replay", "--from-offset", "-1"],
            ["dlq"],
        ],
    )
    def test_bad_flags_are_usage_errors(self, argv: list[str]) -> None:
        """Values the parser refuses exit 2."""
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args(argv)
        assert caught.value.code == EXIT_USAGE

    def test_since_after_until_exits_2_before_kafka(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A window that ends before it starts is a usage error, found before any Kafka call."""
        code = main(
            ["audit", "--since", "2026-02-01", "--until", "2026-01-01", "--log-format", "json"]
        )
        assert code == EXIT_USAGE
        assert "--since" in capsys.readouterr().err

    def test_offsets_without_partition_exit_2_before_kafka(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--from-offset needs --partition: exit 2, naming both."""
        code = main(["dlq", "replay", "--from-offset", "5", "--log-format", "json"])
        assert code == EXIT_USAGE
        assert "--partition" in capsys.readouterr().err
