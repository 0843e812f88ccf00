"""``MultiprocessExport`` in a fresh interpreter: counters add only what is new (a dropped
breaker's counts stay counted), the state gauge follows the live breakers, ``stop()``
removes this process's live gauges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from obs_scrape import by_label, calls_by_kind, samples

HERE = Path(__file__).resolve().parent
STATE = "fineflow_circuitbreaker_state"


def test_the_multiprocess_figures_step_by_step(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(HERE / "obs_multiprocess_script.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    texts = [samples(text, "mp-shared") for text in json.loads(done.stdout)]
    both, dropped, opened, stopped = texts
    assert calls_by_kind(both) == {"successful": 2}
    assert by_label(both, STATE, "state")["closed"] == 2
    assert calls_by_kind(dropped) == {"successful": 2}
    assert by_label(dropped, STATE, "state")["closed"] == 1
    assert calls_by_kind(opened) == {"successful": 3, "failed": 1}
    assert by_label(opened, STATE, "state") == {
        "closed": 0,
        "open": 1,
        "half_open": 0,
        "disabled": 0,
        "forced_open": 0,
        "metrics_only": 0,
    }
    transitions = by_label(opened, "fineflow_circuitbreaker_transitions_total", "to")
    assert transitions == {"open": 1}
    assert calls_by_kind(stopped) == {"successful": 3, "failed": 1}
    assert by_label(stopped, STATE, "state") == {}
