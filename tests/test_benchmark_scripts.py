"""The one-GPU check (benchmarks/gpu_check.sh) runs end to end in its smoke mode, tiny configs on
the CPU, so a lent GPU's minutes are not spent on a script bug (shellcheck: test_launch.py)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_config_and_appends_nothing():
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes()
    env = {**os.environ, "PY": sys.executable, "KILN_GPU_CHECK_SMOKE": "1"}
    env.pop("OUT", None)
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "failed or timed out" not in result.stdout, result.stdout[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    configs = [row.split("|")[1].strip() for row in rows if ":tiny" in row]
    # The five runs, the targets first: gpt:1b, bert:base, t5:base, gpt:base, gpt:medium.
    assert configs == ["gpt:tiny", "bert:tiny", "t5:tiny", "gpt:tiny", "gpt:tiny"], configs
    assert all("bfloat16" in row for row in rows if ":tiny" in row)
    assert results.read_bytes() == before
