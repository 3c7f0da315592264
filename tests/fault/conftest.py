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
        # Lists of records (one per fault, say) get a line each, under their case.
        rows = {k: v for k, v in values.items() if isinstance(v, list)}
        shown = ", ".join(f"{k}={v}" for k, v in values.items() if k not in rows)
        terminalreporter.write_line(f"{result['case']:<34} {result['mode']:<14} {shown}")
        for name, items in rows.items():
            for item in items:
                fields = item.items() if isinstance(item, dict) else [("", item)]
                line = ", ".join(f"{k}={v}" if k else str(v) for k, v in fields)
                terminalreporter.write_line(f"{'':<4}{name}: {line}")
    target = os.environ.get("STREAMER_FAULT_RESULTS")
    if target:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in RESULTS))
        terminalreporter.write_line(f"results written to {path}")
