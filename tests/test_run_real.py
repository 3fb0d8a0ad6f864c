"""End to end on the real embedded model: `layerflow run --quick` as a user runs it, and the examples.

These are the README's main job in quick form (CI runs them); the full default run takes about
15 minutes and is timed in docs/run.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_gemma3, run_cli
from layerflow.results import RunResults

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


def test_quick_run_writes_report_plots_and_resumes(quick_run_cli):
    out, result = quick_run_cli  # conftest: one quick run per session, shared with test_trace.py
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert [record["stages"][s]["status"] for s in ("capture", "train", "eval", "transfer", "report")] == ["done"] * 5
    assert record["stages"]["cross_model"]["status"] == "not needed"
    assert record["config"]["models"] == [{"name": "smollm2-135m", "layers": [0, 10, 19, 29]}]
    assert (out / "report.md").exists() and (out / "summary.json").exists()
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "transfer_heatmap-smollm2-135m.png" in pngs and "sae_quality.png" in pngs
    assert all((out / "plots" / p).with_suffix(".pdf").exists() for p in pngs)
    results = RunResults.load(out)
    model = results.models["smollm2-135m"]
    assert [s.layer for s in model.transfer.sources] == [0, 10, 19, 29]
    assert all(e.delta_ce is not None for e in model.evals.values())  # spliced evals ran
    for line in ("capture", "train", "report"):
        assert line in result.stdout

    again = run_cli("run", "--quick", "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert all(stages[s]["last_invocation"].startswith("skipped") for s in ("capture", "train", "eval", "transfer", "report"))

    report = run_cli("report", str(out))
    assert report.returncode == 0, report.stderr[-3000:]


@needs_gemma3
def test_quick_two_model_run_has_cross_model_transfer(tmp_path):
    out = tmp_path / "two"
    result = run_cli("run", str(ROOT / "configs" / "offline-two-models.toml"), "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    results = RunResults.load(out)
    assert set(results.models) == {"smollm2-135m", "gemma3-270m"}
    pairs = {(c.model_a, c.model_b) for c in results.cross}
    assert pairs == {("smollm2-135m", "gemma3-270m"), ("gemma3-270m", "smollm2-135m")}
    assert (out / "plots" / "cross_model-smollm2-135m~gemma3-270m.png").exists()
    assert "gemma3-270m" in (out / "report.md").read_text()


def test_examples_run_offline_in_quick_mode(tmp_path):
    def example(name: str, *args: str) -> str:
        done = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--quick", *args],
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    printed = example("capture_and_train.py", "--out", str(tmp_path))
    assert "2 SAEs" in printed and "FVU" in printed
    printed = example("transfer_from_saelens_folders.py", "--saes", str(tmp_path / "train" / "saes"),
                      "--store", str(tmp_path / "capture"), "--out", str(tmp_path / "transfer"))
    assert (tmp_path / "transfer" / "transfer_matrix.json").exists() and "relative transfer" in printed
    example("plot_transfer_heatmap.py", "--matrix", str(tmp_path / "transfer"), "--out", str(tmp_path / "plot"))
    assert (tmp_path / "plot.png").exists()
