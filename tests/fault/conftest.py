"""The fault suite (marker `fault`): prints the counts of every case at the end of the session.

Set STREAMER_FAULT_RESULTS to a path to also write them there as JSON lines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fault.support import FULL, RESULTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    terminalreporter.section(f"fault suite results ({'full' if FULL else 'short'} form)")
    for result in RESULTS:
        values = {k: v for k, v in result.items() if k not in ("case", "mode")}
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        terminalreporter.write_line(f"{result['case']:<34} {result['mode']:<14} {shown}")
    target = os.environ.get("STREAMER_FAULT_RESULTS")
    if target:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in RESULTS))
        terminalreporter.write_line(f"results written to {path}")
