"""`layerflow models` and `layerflow sites` as a user sees them."""

from typer.testing import CliRunner

from layerflow.models.zoo import ZOO
from layerflow_cli.main import app

runner = CliRunner()


def test_models_lists_the_whole_zoo():
    result = runner.invoke(app, ["models"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    for name, spec in ZOO.items():
        row = next(line for line in result.stdout.splitlines() if f" {name} " in line)
        assert f" {spec.n_layers} " in row and f" {spec.d_model} " in row and f" {spec.d_mlp} " in row


def test_sites_of_the_default_model_and_a_parallel_one():
    wide = {"COLUMNS": "250"}
    smol = runner.invoke(app, ["sites", "smollm2-135m"], env=wide)
    assert smol.exit_code == 0
    assert "blocks.{L}.mlp.hook_in" in smol.stdout and "blocks.{L}.hook_resid_mid" in smol.stdout
    pythia = runner.invoke(app, ["sites", "pythia-1.4b"], env=wide)  # hub model: config only, no download
    assert pythia.exit_code == 0
    resid_mid = next(line for line in pythia.stdout.splitlines() if line.strip("│ ").startswith("resid_mid"))
    assert "in parallel" in resid_mid and "blocks.{L}.hook_resid_mid" not in pythia.stdout
