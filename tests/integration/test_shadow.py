"""Shadow scoring on a real broker: `topics create` makes the shadow topic, and a scorer with a
challenger writes one shadow verdict per verdict (inside its transactions under exactly-once)
without changing any verdict."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from streamer.model.artifact import card_path_for, load_model
from streamer.serde import decode_verdict
from tests.conftest import ROOT, Topics, resave_model
from tests.integration.support import (
    produce_synthetic,
    read_all,
    run_scorer,
    scorer_env,
    streamer_command,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_challenger_verdicts_go_to_the_shadow_topic(
    bootstrap_servers: str, topics: Topics, model_path: Path, tmp_path: Path
) -> None:
    source = tmp_path / "source.skops"
    shutil.copy(model_path, source)
    shutil.copy(card_path_for(model_path), card_path_for(source))
    challenger = tmp_path / "challenger.skops"
    card = resave_model(source, challenger, threshold=0.6, name="fraud-challenger")
    shadow_topic = f"shadow-{uuid.uuid4().hex[:12]}"
    env = scorer_env(
        bootstrap_servers,
        topics,
        model_path,
        STREAMER_SHADOW_MODEL_PATH=str(challenger),
        STREAMER_SHADOW_TOPIC=shadow_topic,
        STREAMER_PROCESSING_GUARANTEE="exactly-once",
    )
    created = subprocess.run(
        streamer_command("topics", "create", "--partitions", "3"),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert created.returncode == 0, created.stderr
    assert f"{shadow_topic}: created" in created.stdout
    assert f"{topics.input}: exists" in created.stdout

    events = produce_synthetic(bootstrap_servers, topics.input, 3_000, seed=909)
    result = run_scorer(env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"shadow model loaded"' in result.stderr

    champion = load_model(model_path).card
    verdicts = {
        v["transaction_id"]: v
        for v in (
            decode_verdict(r.value or b"") for r in read_all(bootstrap_servers, topics.output)
        )
    }
    shadows = [decode_verdict(r.value or b"") for r in read_all(bootstrap_servers, shadow_topic)]
    assert set(verdicts) == {e.record["transaction_id"] for e in events}
    assert sorted(s["transaction_id"] for s in shadows) == sorted(verdicts)
    assert {(v["model_name"], v["model_version"]) for v in verdicts.values()} == {
        (champion.name, champion.version)
    }
    assert {(s["model_name"], s["model_version"], s["threshold"]) for s in shadows} == {
        ("fraud-challenger", card.version, 0.6)
    }
    for shadow in shadows:  # the same fitted estimator: the same score, its own threshold
        verdict = verdicts[shadow["transaction_id"]]
        assert shadow["score"] == pytest.approx(verdict["score"])
        assert shadow["is_fraud"] == (shadow["score"] >= 0.6)
