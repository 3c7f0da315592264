"""The file modes against the stream on a real broker: `streamer score` scores as `streamer run`."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from streamer.synthetic import SyntheticWorld
from tests.conftest import ROOT, Topics
from tests.files_support import events_table, read_any, write_events
from tests.integration.support import run_scorer, scorer_env, streamer_command
from tests.integration.test_state import publish_events, scores_by_id

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class TestScoreParity:
    def test_score_gives_the_stream_s_score_for_every_transaction(
        self, bootstrap_servers: str, topics: Topics, model_path: Path, tmp_path: Path
    ) -> None:
        """The same events through `streamer run` and `streamer score`: identical scores."""
        events = list(SyntheticWorld(41, n_cards=300).generate(5_000))
        publish_events(bootstrap_servers, topics.input, events)
        env = scorer_env(bootstrap_servers, topics, model_path)
        streamed = run_scorer(env)
        assert streamed.returncode == 0, streamed.stderr[-3000:]
        stream_scores = scores_by_id(bootstrap_servers, topics.output)

        # The file in another order: `score` applies rows in event-time order, as they streamed.
        shuffled = events[:]
        random.Random(5).shuffle(shuffled)
        data = write_events(events_table(shuffled), tmp_path / "events.parquet")
        output = tmp_path / "verdicts.csv"
        result = subprocess.run(
            streamer_command("score", "--input", str(data), "--output", str(output)),
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        verdicts = read_any(output)
        file_scores = dict(
            zip(
                verdicts.column("transaction_id").to_pylist(),
                verdicts.column("score").to_pylist(),
                strict=True,
            )
        )
        assert len(file_scores) == len(events) == verdicts.num_rows
        assert set(file_scores) == set(stream_scores)
        differing = [tid for tid, score in file_scores.items() if stream_scores[tid] != [score]]
        assert differing == [], f"{len(differing)} of {len(events)} scores differ from the stream"
