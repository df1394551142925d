"""Smoke test: benchmarks/near_cache.py --quick runs end to end on real redis-servers.

Only what must hold on any machine is asserted (no timing): readers never went back to an older
version, every tampered payload was refused and none ran, no operation failed while Redis was paused
or down, and every reader served Redis' value again after its restart.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "near_cache.py"

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_benchmark_quick_run(tmp_path: Path, redis_url: str) -> None:  # redis_url: skips/fails as Redis does
    out = tmp_path / "near.json"
    # a subprocess: the benchmark's reader processes (spawn) import it as __main__
    subprocess.run([sys.executable, str(BENCH), "--quick", "--readers", "2", "--json", str(out)],
                   check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    for run in ("invalidation_idle_readers", "invalidation_busy_readers"):
        assert result[run]["went_backwards"] == 0
        assert result[run]["reads"] > 0
    assert result["tampering"]["refused"] == result["tampering"]["written"] > 0
    assert result["tampering"]["executed"] == 0
    assert result["outage"]["failed_operations"] == {"healthy": 0, "paused": 0, "down": 0}
    assert result["outage"]["recovery_failures"] == 0
    assert result["latency_ns"]["near_l1_hit"] > 0
