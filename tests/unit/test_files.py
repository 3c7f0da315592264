"""The file modes without a broker: reading rows, `score`, `features`, `train --data`."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from structlog.testing import capture_logs

from streamer.cli import main
from streamer.errors import DataFileError
from streamer.features import FEATURE_ORDER, build_features
from streamer.files import Progress, load_rows
from streamer.model.artifact import ModelCard, card_path_for
from streamer.model.scorer import Scorer
from streamer.model.train import FRACTION_SPLIT, MIN_TRAINING_DAYS, train_from_file
from streamer.pipeline import Histories, Pipeline
from streamer.serde import (
    TRANSACTION_FIELDS,
    TRANSACTION_SCHEMA,
    decode_and_validate,
    encode_transaction,
)
from streamer.synthetic import LabelledTransaction, SyntheticWorld
from tests.files_support import events_table, read_any, write_events

HISTORY_EVENTS = 12_000
"""About ten days of a world at 1,500 events a day: enough for the split by whole days."""


def history(seed: int = 3, count: int = HISTORY_EVENTS) -> list[LabelledTransaction]:
    return list(SyntheticWorld(seed, events_per_day=1_500, n_cards=500).generate(count))


@pytest.fixture(scope="session")
def trained_on_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ModelCard]:
    """A model trained by `train_from_file` on a labelled Parquet history (once per session)."""
    folder = tmp_path_factory.mktemp("own-data")
    data = write_events(events_table(history()), folder / "history.parquet")
    model = folder / "model.skops"
    return data, model, train_from_file(model, data)


def one_table(**cells: object) -> pa.Table:
    """A one-row table of a valid transaction, with `cells` replacing its values."""
    record = dict(history(count=1)[0].record)
    record.update(cells)
    return pa.table({name: [value] for name, value in record.items()})


class TestReading:
    def test_event_time_formats_agree(self, tmp_path: Path) -> None:
        """Epoch ms, a Parquet timestamp and RFC 3339 text with an offset give the same ms."""
        millis = 1_767_225_601_254
        tables = {
            "ms.parquet": one_table(event_time=millis),
            "us.parquet": one_table().set_column(
                1, "event_time", pa.array([millis * 1000 + 999], pa.timestamp("us"))
            ),
            "text.csv": one_table(event_time="2026-01-01T01:00:01.254+01:00"),
            "zulu.csv": one_table(event_time="2026-01-01T00:00:01.254Z"),
            "digits.csv": one_table(event_time=str(millis)),
        }
        for name, table in tables.items():
            rows = load_rows(write_events(table, tmp_path / name))
            assert rows.problems == {}, name
            assert rows.columns.column("event_time").to_pylist() == [millis], name

    @pytest.mark.parametrize(
        ("cells", "reason"),
        [
            ({"event_time": "2026-01-01T00:00:01"}, "event_time: not epoch milliseconds or an"),
            ({"event_time": "yesterday"}, "event_time: not epoch milliseconds or an RFC 3339"),
            ({"amount": "12,50"}, "amount: not a number (got '12,50')"),
            ({"card_present": "maybe"}, "card_present: not a boolean (got 'maybe')"),
            ({"merchant_id": ""}, "merchant_id: missing value"),
            ({"amount": ""}, "amount: missing value"),
        ],
    )
    def test_a_bad_cell_is_a_decode_problem_naming_its_column(
        self, tmp_path: Path, cells: dict[str, object], reason: str
    ) -> None:
        """A cell that cannot be converted fails its row at stage decode, naming the column."""
        good, bad = one_table(), one_table(**cells)
        text = pa.schema([(name, pa.string()) for name in good.column_names])
        table = pa.concat_tables([good.cast(text), bad.cast(text)])
        rows = load_rows(write_events(table, tmp_path / "bad.csv"))
        assert list(rows.problems) == [1]
        assert rows.problems[1].stage == "decode"
        assert str(rows.problems[1]).startswith(reason)

    def test_avro_container_files_are_read(self, tmp_path: Path) -> None:
        """An Avro object container file with transaction.avsc's fields (and a label) reads."""
        events = history(count=50)
        schema = dict(TRANSACTION_SCHEMA)
        schema["fields"] = [*schema["fields"], {"name": "is_fraud", "type": "boolean"}]
        path = tmp_path / "history.avro"
        with path.open("wb") as stream:
            fastavro.writer(stream, schema, [dict(e.record, is_fraud=e.is_fraud) for e in events])
        rows = load_rows(path, label_column="is_fraud")
        assert rows.problems == {}
        assert rows.columns.column("event_time").to_pylist() == [
            e.record["event_time"] for e in events
        ]
        assert rows.labels is not None
        assert rows.labels.tolist() == [e.is_fraud for e in events]

    def test_a_missing_column_stops_with_its_name(self, tmp_path: Path) -> None:
        """A file without a required field is refused as a whole, naming the column."""
        path = write_events(one_table().drop_columns(["currency"]), tmp_path / "x.parquet")
        with pytest.raises(DataFileError, match="missing column currency"):
            load_rows(path)

    def test_optional_columns_may_be_absent(self, tmp_path: Path) -> None:
        """card_country and card_avg_amount default to null, as in the schema."""
        table = one_table().drop_columns(["card_country", "card_avg_amount"])
        rows = load_rows(write_events(table, tmp_path / "x.parquet"))
        assert rows.problems == {}
        assert rows.columns.column("card_country").to_pylist() == [None]

    def test_a_column_of_the_wrong_type_stops(self, tmp_path: Path) -> None:
        """A column that cannot hold its field at all is a problem of the file, not of rows."""
        path = write_events(one_table(transaction_id=7), tmp_path / "x.parquet")
        with pytest.raises(DataFileError, match="column transaction_id: expected text"):
            load_rows(path)

    def test_rows_are_ordered_by_event_time_ties_in_file_order(self, tmp_path: Path) -> None:
        """The processing order is a stable sort by event time."""
        table = pa.concat_tables(
            [one_table(event_time=t, transaction_id=f"t{i}") for i, t in enumerate((5, 3, 5, 1))]
        )
        rows = load_rows(write_events(table, tmp_path / "x.parquet"))
        assert rows.order().tolist() == [3, 1, 0, 2]


class TestScore:
    def test_scores_equal_the_streams_feature_path(
        self, trained_on_file: tuple[Path, Path, ModelCard], tmp_path: Path
    ) -> None:
        """`streamer score` gives each row the score of the stream's features in time order."""
        _, model, card = trained_on_file
        events = history(seed=8, count=3_000)
        expected = Scorer.from_path(model).score(build_features([e.record for e in events]))
        data = write_events(events_table(events[::-1]), tmp_path / "in.csv")
        output = tmp_path / "out.parquet"
        assert (
            main(
                ["score", "--input", str(data), "--output", str(output), "--model-path", str(model)]
            )
            == 0
        )
        verdicts = pq.read_table(output)
        assert verdicts.column_names == [
            "transaction_id",
            "card_id",
            "score",
            "is_fraud",
            "threshold",
            "model_name",
            "model_version",
            "event_time",
            "scored_at",
        ]
        scores = dict(
            zip(
                verdicts.column("transaction_id").to_pylist(),
                verdicts.column("score").to_pylist(),
                strict=True,
            )
        )
        assert [scores[e.record["transaction_id"]] for e in events] == expected.tolist()
        flags = verdicts.column("is_fraud").to_pylist()
        assert flags == [s >= card.threshold for s in verdicts.column("score").to_pylist()]
        assert set(verdicts.column("model_version").to_pylist()) == {card.version}

    def test_bad_rows_go_to_the_rejects_with_the_streams_reasons(
        self, trained_on_file: tuple[Path, Path, ModelCard], tmp_path: Path
    ) -> None:
        """Invalid rows land in --rejects with stage and the dead-letter reason; others score."""
        _, model, _ = trained_on_file
        events = history(seed=9, count=200)
        table = events_table(events, label=None)
        bad_currency = dict(events[5].record, currency="XXX")
        currencies = table.column("currency").to_pylist()
        currencies[5] = "XXX"
        amounts = table.column("amount").to_pylist()
        amounts[7] = None
        table = table.set_column(6, "currency", pa.array(currencies))
        table = table.set_column(5, "amount", pa.array(amounts))
        data = write_events(table, tmp_path / "in.parquet")
        output, rejects = tmp_path / "out.csv", tmp_path / "rejects.csv"
        argv = ["score", "--input", str(data), "--output", str(output), "--model-path", str(model)]
        assert main([*argv, "--rejects", str(rejects)]) == 0

        rejected = read_any(rejects).to_pylist()
        assert [r["row_number"] for r in sorted(rejected, key=lambda r: r["row_number"])] == [6, 8]
        by_row = {r["row_number"]: r for r in rejected}
        stream = decode_and_validate(
            [encode_transaction(bad_currency)], [bad_currency["card_id"].encode()], 65_536
        )
        ((_, stream_error),) = stream.errors
        assert by_row[6]["error_stage"] == "validate"
        assert by_row[6]["error_reason"] == str(stream_error)
        assert by_row[6]["error_class"] == "ValidationError"
        assert by_row[6]["transaction_id"] == events[5].record["transaction_id"]
        assert (by_row[8]["error_stage"], by_row[8]["error_reason"]) == (
            "decode",
            "amount: missing value",
        )
        verdicts = read_any(output)
        assert verdicts.num_rows == 198
        # CSV times as RFC 3339 UTC text, to the millisecond.
        first = output.read_text().splitlines()[1]
        assert re.search(r',"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z",', first), first

    def test_without_rejects_a_bad_row_stops_and_nothing_is_written(
        self, trained_on_file: tuple[Path, Path, ModelCard], tmp_path: Path
    ) -> None:
        """No destination for rejects: exit 2 naming the row, and no output file."""
        _, model, _ = trained_on_file
        table = pa.concat_tables([one_table(), one_table(country="ZZ")])
        data = write_events(table, tmp_path / "in.parquet")
        output = tmp_path / "out.parquet"
        argv = ["score", "--input", str(data), "--output", str(output), "--model-path", str(model)]
        assert main(argv) == 2
        assert not output.exists()
        assert list(tmp_path.iterdir()) == [data], "no temporary file is left behind"


class TestFeatures:
    def test_the_matrix_is_the_scorers_with_names_and_label(self, tmp_path: Path) -> None:
        """`streamer features`: ids, time, FEATURE_ORDER columns as built, then the label."""
        events = history(seed=4, count=2_000)
        data = write_events(events_table(events), tmp_path / "in.parquet")
        output = tmp_path / "features.parquet"
        assert main(["features", "--data", str(data), "--output", str(output)]) == 0
        table = pq.read_table(output)
        assert table.column_names == ["transaction_id", "event_time", *FEATURE_ORDER, "is_fraud"]
        matrix = np.column_stack([table.column(name).to_numpy() for name in FEATURE_ORDER])
        np.testing.assert_array_equal(matrix, build_features([e.record for e in events]))
        assert table.column("is_fraud").to_pylist() == [int(e.is_fraud) for e in events]


class TestTrainOnFile:
    def test_the_card_records_the_data(self, trained_on_file: tuple[Path, Path, ModelCard]) -> None:
        """sha256, rows, fraud rate, time range and split boundaries of the file are on the card."""
        data, model, card = trained_on_file
        training = card.training
        assert training["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
        assert training["rows"] == HISTORY_EVENTS
        assert 0 < training["fraud_rate"] < 0.2
        assert training["time_range"]["first_event"].startswith("2026-01-01T")
        days = training["days"]
        assert days >= MIN_TRAINING_DAYS
        # Whole UTC days from the first event's: test the last two, validation the two before.
        assert training["split_boundaries"] == {
            "validation_from": f"2026-01-{days - 3:02d}T00:00:00.000+00:00",
            "test_from": f"2026-01-{days - 1:02d}T00:00:00.000+00:00",
        }
        assert sum(split["size"] for split in training["splits"].values()) == HISTORY_EVENTS
        saved = json.loads(card_path_for(model).read_text())
        assert saved["training"]["sha256"] == training["sha256"]

    def test_a_short_history_is_split_by_time_fractions(self, tmp_path: Path) -> None:
        """Under seven UTC days: 60/20/20 of the rows in time order, recorded on the card."""
        events = list(SyntheticWorld(6, events_per_day=4_000, n_cards=500).generate(5_000))
        data = write_events(events_table(events), tmp_path / "short.csv")
        card = train_from_file(tmp_path / "m.skops", data)
        sizes = {name: split["size"] for name, split in card.training["splits"].items()}
        assert sizes["train"] == pytest.approx(FRACTION_SPLIT[0] * 5_000, abs=5)
        assert "time fractions" in card.training["split"]
        assert set(card.training["split_boundaries"]) == {"validation_from", "test_from"}

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (
                "label_2",
                r"row 3 \(decode\): is_fraud: the label must be 0 or 1 \(not a boolean \(got 2\)\)",
            ),
            ("no_fraud", "no row has is_fraud = 1"),
            ("label_empty", r"row 3 \(decode\): is_fraud: the label must be 0 or 1 \(missing\)"),
            ("few_rows", "500 rows; training needs at least 1,000"),
            ("no_label", "missing column is_fraud"),
            ("bad_currency", r"row 4 \(validate\): currency: unknown ISO 4217"),
        ],
    )
    def test_a_bad_file_stops_with_exit_2_and_writes_nothing(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str, message: str
    ) -> None:
        """Each problem names the row, column and problem; no model file appears."""
        events = history(seed=2, count=500 if change == "few_rows" else 2_000)
        table = events_table(events)
        labels = table.column("is_fraud").to_pylist()
        if change == "label_2":
            labels[2] = 2
        if change == "label_empty":
            labels[2] = None
        if change == "no_fraud":
            labels = [0] * len(labels)
        table = table.set_column(12, "is_fraud", pa.array(labels))
        if change == "no_label":
            table = table.drop_columns(["is_fraud"])
        if change == "bad_currency":
            currencies = table.column("currency").to_pylist()
            currencies[3] = "XXX"
            table = table.set_column(6, "currency", pa.array(currencies))
        data = write_events(table, tmp_path / "bad.parquet")
        model = tmp_path / "m.skops"
        code = main(
            ["train", "--data", str(data), "--model-path", str(model), "--log-format", "json"]
        )
        assert code == 2
        assert re.search(message, capsys.readouterr().err)
        assert list(tmp_path.iterdir()) == [data]


class TestProgress:
    def test_log_lines_off_a_terminal(self) -> None:
        """Not a TTY: a progress log line per interval and one at the end, never twice."""
        clock = iter([0.0, 1.0, 11.0, 12.0, 13.0]).__next__
        progress = Progress("features", 100, stream=io.StringIO(), interval=10.0, clock=clock)
        with capture_logs() as logs:
            progress.update(10)  # 1 s: too soon
            progress.update(50)  # 11 s
            progress.update(100)  # 12 s: too soon
            progress.update(100, final=True)
        assert [(line["event"], line["done"]) for line in logs] == [
            ("progress", 50),
            ("progress", 100),
        ]

    def test_a_bar_on_a_terminal(self) -> None:
        """On a TTY the pass draws one line that it redraws, ended by the final update."""

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        stream = Terminal()
        progress = Progress("scoring", 4, stream=stream, clock=iter([0.0, 1.0, 2.0]).__next__)
        progress.update(2)
        progress.update(4, final=True)
        assert stream.getvalue().startswith("\rscoring [###############...............] 2/4")
        assert stream.getvalue().endswith("\n")


class TestColumnarPipeline:
    def test_process_columns_matches_process_on_avro(
        self, trained_on_file: tuple[Path, Path, ModelCard]
    ) -> None:
        """The columnar entry gives the Avro entry's verdicts, errors and history, byte for byte."""
        _, model, _ = trained_on_file
        events = history(seed=12, count=400)
        records = [dict(e.record) for e in events]
        records[3]["currency"] = "XXX"
        records[9]["amount"] = -1.0
        pipeline = Pipeline(Scorer.from_path(model), max_event_bytes=65_536)
        avro_state, columns_state, plain_state = Histories(), Histories(), Histories()
        by_value = pipeline.process(
            [encode_transaction(r) for r in records],
            [r["card_id"].encode() for r in records],
            avro_state,
            scored_at=7,
        )
        columns = {name: [r[name] for r in records] for name in TRANSACTION_FIELDS}
        by_column = pipeline.process_columns(columns, columns_state, scored_at=7)
        unencoded = pipeline.process_columns(columns, plain_state, encode=False)
        assert by_column.verdicts == by_value.verdicts
        assert {i: str(e) for i, e in by_column.errors.items()} == {
            i: str(e) for i, e in by_value.errors.items()
        }
        assert sorted(by_value.errors) == [3, 9]
        assert columns_state.histories == avro_state.histories == plain_state.histories
        np.testing.assert_array_equal(unencoded.scores, by_value.scores)
        assert [v is None for v in unencoded.verdicts] == [v is None for v in by_value.verdicts]
