"""The scale benchmark's path at 5,000 cells with a tiny base: every stage runs and lands in the table."""

import subprocess
import sys

import pytest
from stlib_testing import REPO


@pytest.mark.slow  # seven subprocess stages, UMAP included
def test_scale_benchmark_runs_every_stage(tmp_path):
    out = tmp_path / "scale.md"
    done = subprocess.run([sys.executable, "benchmarks/bench_scale.py", "--cells", "5000", "--genes", "300",
                           "--embed-dim", "16", "--steps", "2", "--set-len", "16", "--tiny", "--work", str(tmp_path),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = [line for line in out.read_text().splitlines() if line.startswith("| ") and "stage" not in line]
    stages = ("generate data", "write the ST-Tahoe-shaped base", "stlib velocity", "stlib train", "stlib predict",
              "stlib evaluate", "compare figures")
    assert [row.split(" | ")[0][2:].startswith(s) for row, s in zip(table, stages, strict=True)] == [True] * 7
    for row in table[:1] + table[2:]:  # wall time and peak memory measured for every stage (the base: with the data)
        wall, rss = (float(x) for x in row.split(" | ")[1:3])
        assert wall > 0 and rss > 0
    assert (tmp_path / "runs" / "st_lora" / "checkpoints" / "final.ckpt").exists()
    assert (tmp_path / "figures" / "umap_comparison_all_models.png").exists()
    assert "10,000 steps would take" in out.read_text()
