"""The one-GPU check (benchmarks/gpu_check.sh) runs end to end in its smoke mode, tiny configs on
the CPU, so a lent GPU's minutes are not spent on a script bug (shellcheck: test_launch.py)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


# The script's per-config limit (KILN_GPU_CHECK_TIMEOUT, 100 s) is for the GPU machine's fixed
# budget; 0 turns it off (`timeout 0`), so a loaded CPU only takes longer and never fails.
NO_LIMIT = "0"


def _gpu_check(python: str, limit: str) -> subprocess.CompletedProcess:
    """benchmarks/gpu_check.sh in smoke mode with `python` as $PY and `limit` seconds a
    config; no wall-clock limit of its own."""
    env = {**os.environ, "PY": python, "KILN_GPU_CHECK_SMOKE": "1"}
    env["KILN_GPU_CHECK_TIMEOUT"] = limit
    env.pop("OUT", None)
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    return subprocess.run(["bash", script], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_config_and_appends_nothing():
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes()
    result = _gpu_check(sys.executable, NO_LIMIT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "failed or timed out" not in result.stdout, result.stdout[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    configs = [row.split("|")[1].strip() for row in rows if ":tiny" in row]
    # The five runs, the targets first: gpt:1b, bert:base, t5:base, gpt:base, gpt:medium.
    assert configs == ["gpt:tiny", "bert:tiny", "t5:tiny", "gpt:tiny", "gpt:tiny"], configs
    assert all("bfloat16" in row for row in rows if ":tiny" in row)
    assert results.read_bytes() == before


def test_a_slow_machine_does_not_fail_the_smoke_run(tmp_path):
    """A stand-in Python that takes longer than the per-config limit for every config: with a
    limit every config fails (what a loaded machine did to the smoke test above with 100 s);
    with the limit off, as that test runs it, every config passes, however slow."""
    slow = tmp_path / "slow_python"
    slow.write_text(
        "#!/usr/bin/env bash\nif [[ $1 == -c ]]; then exit 0; fi\nsleep 0.5\n"
        'echo "| $3 | bfloat16 | stand-in |"\n'
    )
    slow.chmod(0o755)
    limited = _gpu_check(str(slow), "0.1")
    assert limited.stdout.count("failed or timed out") == 5, limited.stdout
    unlimited = _gpu_check(str(slow), NO_LIMIT)
    assert unlimited.returncode == 0, unlimited.stderr[-2000:]
    assert "failed or timed out" not in unlimited.stdout
    assert unlimited.stdout.count("| gpt:tiny | bfloat16") == 3, unlimited.stdout
