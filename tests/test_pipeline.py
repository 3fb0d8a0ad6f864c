"""`layerflow run`: the layout, run.json, resume after an interruption, and refusing another run's folder.

A tiny random-init GPT-2 twin stands in for the model (the end-to-end run on the real embedded
model is in test_run_real.py)."""

import json
import os

import pytest

from conftest import tiny_twin
from layerflow.errors import LayerflowError
from layerflow.experiment import ExperimentConfig
from layerflow.pipeline import STAGES, run_experiment
from layerflow.results import RunResults

pytestmark = pytest.mark.usefixtures("one_thread")

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def _config(**changes) -> ExperimentConfig:
    data = {"name": "tiny", "models": [{"name": "gpt2-twin", "layers": [0, 1]}],
            "capture": {"tokens": 1600, "context_size": 32, "source": "random", "holdout": 0.2},
            "train": {"steps": 12, "batch_tokens": 128, "set": {"expansion_factor": 2, "lr": 1e-3}},
            "transfer": {"max_tokens": 256}}
    data.update(changes)
    return ExperimentConfig.from_dict(data)


def _run(cfg, out, **kw):
    return run_experiment(cfg, out, load=tiny_twin, **kw)


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_layout_and_run_record(tmp_path):
    record = _run(_config(), tmp_path)
    from sae_lens import SAE

    for hook in HOOKS:
        sae = SAE.load_from_disk(tmp_path / "saes" / "gpt2-twin" / hook)  # SAELens folders, one per site
        assert sae.cfg.metadata.hook_name == hook
    assert (tmp_path / "activations" / "gpt2-twin" / "capture.json").exists()
    assert (tmp_path / "saes" / "gpt2-twin" / "evals.json").exists()
    assert (tmp_path / "transfer" / "gpt2-twin" / "transfer_matrix.json").exists()
    on_disk = json.loads((tmp_path / "run.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["config"] == json.loads(json.dumps(_config().to_dict()))
    stages = on_disk["stages"]
    for stage in ("capture", "train", "eval", "transfer"):
        assert stages[stage]["status"] == "done" and stages[stage]["seconds"] >= 0
    assert stages["cross_model"]["status"] == "not needed"  # one model
    assert stages["report"]["status"] == "done"
    assert (tmp_path / "report.md").exists() and (tmp_path / "summary.json").exists()
    assert (tmp_path / "plots" / "transfer_heatmap-gpt2-twin.png").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["train"]["seconds"] == stages["train"]["seconds"]  # the report quotes run.json
    provenance = on_disk["provenance"]
    assert provenance["versions"]["sae-lens"] == "6.54.12" and provenance["seed"] == 0
    assert "gpt2-twin" in provenance["weights"]
    results = RunResults.load(tmp_path)
    assert results.models["gpt2-twin"].hooks == HOOKS
    assert results.models["gpt2-twin"].transfer["relative_transfer"].shape == (2, 2)
    assert set(results.models["gpt2-twin"].evals) == set(HOOKS)


def test_interrupted_run_resumes_with_only_later_stages(tmp_path):
    cfg = _config()

    def interrupt(stage, item, done, total):
        if stage == "transfer":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(cfg, tmp_path, progress=interrupt)
    after_first = json.loads((tmp_path / "run.json").read_text())["stages"]
    assert [after_first[s]["status"] for s in ("capture", "train", "eval", "transfer")] == ["done"] * 3 + ["running"]  # cut off while running
    kept = _mtimes(tmp_path / "activations") | _mtimes(tmp_path / "saes")
    seen = []
    record = _run(cfg, tmp_path, until="transfer", progress=lambda stage, item, done, total: seen.append(stage))
    assert set(seen) == {"transfer"}  # nothing before it ran again
    assert _mtimes(tmp_path / "activations") | _mtimes(tmp_path / "saes") == kept
    stages = record["stages"]
    for stage in ("capture", "train", "eval"):
        assert stages[stage]["last_invocation"].startswith("skipped")
        assert stages[stage]["seconds"] == after_first[stage]["seconds"]  # the wall time of the run that did it
    assert stages["transfer"]["status"] == "done" and stages["transfer"]["last_invocation"] == "ran"


def test_training_interrupted_midway_resumes_from_its_checkpoint(tmp_path):
    cfg = _config(train={"steps": 12, "batch_tokens": 128, "checkpoint_every": 4,
                         "set": {"expansion_factor": 2, "lr": 1e-3}})

    def interrupt(stage, item, done, total):
        if stage == "train" and done == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(cfg, tmp_path, progress=interrupt)
    assert list((tmp_path / "saes" / "gpt2-twin" / "checkpoints").glob("step-000000008"))
    steps = []
    _run(cfg, tmp_path, until="train", progress=lambda s, i, done, t: steps.append(done) if s == "train" else None)
    assert steps[1] == 8  # picked up at the last checkpoint, not at 0
    fresh = tmp_path / "fresh"
    _run(cfg, fresh, until="train")
    from safetensors.torch import load_file

    for hook in HOOKS:
        resumed = load_file(tmp_path / "saes" / "gpt2-twin" / hook / "sae_weights.safetensors")
        straight = load_file(fresh / "saes" / "gpt2-twin" / hook / "sae_weights.safetensors")
        assert all((resumed[k] == straight[k]).all() for k in straight)  # resuming changes nothing


def test_refuses_another_runs_folder_and_restarts_with_overwrite(tmp_path):
    _run(_config(), tmp_path, until="capture")
    other = _config(capture={"tokens": 3200, "context_size": 32, "source": "random", "holdout": 0.2})
    with pytest.raises(LayerflowError, match=r"different config \(capture.tokens: 1600 -> 3200\).*--overwrite"):
        _run(other, tmp_path, until="capture")
    record = _run(other, tmp_path, until="capture", overwrite=True)
    assert record["stages"]["capture"]["last_invocation"] == "ran"
    assert json.loads((tmp_path / "activations" / "gpt2-twin" / "capture.json").read_text())["n_tokens"] == 3200
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(LayerflowError, match=r"not empty and holds no layerflow run"):
        _run(_config(), tmp_path / "foreign")
    with pytest.raises(LayerflowError, match=r"Unknown stage 'trian'.*Did you mean 'train'"):
        _run(_config(), tmp_path / "new", until="trian")
    assert not os.path.exists(tmp_path / "new")


def test_stages_are_the_documented_order():
    assert STAGES == ("capture", "train", "eval", "transfer", "cross_model", "report")
