"""The `layerflow` command: a thin Typer front-end. Each command parses its options, calls the library
and hands the result to `render`; option defaults come from `layerflow.defaults`.

Each command imports the library modules it needs when it runs: importing all of layerflow
(torch, TransformerLens, SAELens, matplotlib) takes about ten seconds, and `layerflow --help`,
`layerflow models` or a bad option should answer at once.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from layerflow import defaults
from layerflow.errors import LayerflowError
from layerflow.models.zoo import ZOO
from layerflow_cli import render
from layerflow_cli.render import err, out

app = typer.Typer(
    help="Study how sparse-dictionary features form and transfer across layers and models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
OVERWRITE_HELP = ("Start again: remove what layerflow wrote in --out (a folder layerflow did not write is never "
                  "touched).")
MODEL_HELP = "Zoo model name (see `layerflow models`)."
LAYERS_HELP = "'all', a slice like '0:30:2', or a list like '3,7,11'."
SOURCE_HELP = "'default' (shipped corpus), a .txt/.txt.gz path, hf:DATASET[:CONFIG], or 'random'."


@app.command()
def models() -> None:
    """List the model zoo: shapes, tokenizer and where the weights come from."""
    render.zoo_table(ZOO, defaults.MODEL)


@app.command()
def sites(model: str = typer.Argument(defaults.MODEL, help=MODEL_HELP)) -> None:
    """Show every site kind of a model, the TransformerLens hook it resolves to, or why it is impossible."""
    from layerflow.models.load import model_config

    render.sites_table(model, model_config(model))


@app.command()
def capture(
    model: str = typer.Argument(defaults.MODEL, help=MODEL_HELP),
    layers: str = typer.Option("all", help=LAYERS_HELP),
    site: str = typer.Option(",".join(defaults.SITE_KINDS), "--sites", help="Comma-separated site kinds (see `layerflow sites`)."),
    tokens: int = typer.Option(defaults.CAPTURE_TOKENS, min=1, help="Total tokens to capture (train + held-out)."),
    context_size: int = typer.Option(defaults.CONTEXT_SIZE, min=2, help="Tokens per sequence, BOS included."),
    source: str = typer.Option(defaults.SOURCE, help=SOURCE_HELP),
    holdout: float = typer.Option(defaults.HOLDOUT_FRACTION, help="Fraction of sequences kept as held-out."),
    prepend_bos: bool = typer.Option(defaults.PREPEND_BOS, help="Start every sequence with the BOS token."),
    dtype: str = typer.Option(defaults.STORE_DTYPE, help="Storage dtype: float32, bfloat16 or float16."),
    batch_size: int = typer.Option(defaults.FORWARD_BATCH, min=1, help="Sequences per forward pass."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output directory.", show_default="artifacts/<model>/capture"),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
    seed: int = typer.Option(defaults.SEED, help="Seed for sampling sequences."),
    device: str = typer.Option(defaults.DEVICE, help="Torch device."),
) -> None:
    """Capture many layers in one forward pass per batch, streamed to disk in shards (resumable)."""
    from layerflow.capture import CaptureConfig
    from layerflow.capture import capture as run_capture
    from layerflow.models.load import load_model
    from layerflow.models.sites import parse_kind, parse_layers
    from layerflow.models.zoo import get_spec

    layer_list = parse_layers(layers, get_spec(model).n_layers, model)
    kinds = [parse_kind(k.strip()) for k in site.split(",") if k.strip()]
    out_dir = out_dir or Path("artifacts") / model / "capture"
    cfg = CaptureConfig(model, layer_list, kinds, n_tokens=tokens, context_size=context_size,
                        prepend_bos=prepend_bos, source=source, holdout_fraction=holdout, dtype=dtype,
                        batch_size=batch_size, seed=seed, device=device)
    with err.status(f"loading {model}"):
        loaded = load_model(model, device=device)
    started = time.perf_counter()
    with render.progress("capturing", "tokens") as report:
        manifest = run_capture(cfg, out_dir, overwrite=overwrite, loaded=loaded, progress=report)
    render.capture_summary(model, manifest, out_dir, time.perf_counter() - started)


def _parse_setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise LayerflowError(f"--set '{text}' is not KEY=VALUE (e.g. --set k=64 or --set lr=1e-3).")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


@app.command()
def presets() -> None:
    """List the schedule presets of `layerflow train --preset`: architecture and hyperparameters by depth."""
    from layerflow.train import PRESETS

    render.presets_table(PRESETS)


@app.command()
def train(
    store: Optional[Path] = typer.Argument(None, help="A capture directory (from `layerflow capture`); omit with --online."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory.", show_default="<store>/../train"),
    online: Optional[str] = typer.Option(None, help="Train from live forwards of this zoo model instead of a store."),
    layers: str = typer.Option("all", help="With --online: layers, as for `capture`."),
    tokens: int = typer.Option(defaults.CAPTURE_TOKENS, min=1, help="With --online: tokens (train + held-out), as for `capture`."),
    context_size: int = typer.Option(defaults.CONTEXT_SIZE, min=2, help="With --online: tokens per sequence."),
    source: str = typer.Option(defaults.SOURCE, help="With --online: text source, as for `capture`."),
    preset: str = typer.Option(defaults.PRESET, help="Schedule preset: default, notes or transcoder (`layerflow presets` "
                               "shows their architectures and hyperparameters)."),
    schedule_file: Optional[Path] = typer.Option(None, "--schedule", help="A LayerSchedule JSON file (overrides --preset)."),
    architecture: Optional[str] = typer.Option(None, help="Override the schedule's SAE architecture."),
    settings: list[str] = typer.Option([], "--set", help="Override a hyperparameter at every depth, e.g. --set k=64."),
    hooks: Optional[str] = typer.Option(None, help="Comma-separated hook names to train (default: every captured site)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Optimizer steps (default: --epochs over the training tokens)."),
    epochs: float = typer.Option(defaults.EPOCHS, min=0.0, help="Passes over the captured training tokens when --steps is not given."),
    batch_tokens: int = typer.Option(defaults.BATCH_TOKENS, min=1, help="Tokens per step (every site sees the same tokens)."),
    include_special_tokens: bool = typer.Option(False, help="Train and evaluate on BOS/special positions too."),
    checkpoint_every: int = typer.Option(defaults.CHECKPOINT_EVERY, min=1, help="Steps between checkpoints (resume picks the last)."),
    samples_every: int = typer.Option(defaults.SAMPLES_EVERY, min=0, help="Every N steps, keep each latent's top-activating "
                                      "held-out tokens (see `layerflow samples`); 0: never."),
    target_site: str = typer.Option(defaults.TRANSCODER_TARGET, help="Transcoders: the site kind each input site's transcoder predicts."),
    dead_feature_window: Optional[int] = typer.Option(defaults.DEAD_FEATURE_WINDOW, min=1, help="Steps without firing "
                                                      "before a latent counts as dead (AuxK works on it after this many "
                                                      "steps). Default: a fifth of the run, between 10 and 1000."),
    seed: int = typer.Option(defaults.SEED),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
    model_eval: bool = typer.Option(True, help="Also splice the SAEs into the model for CE/KL at the end."),
) -> None:
    """Train one SAE (or transcoder) per captured site from the same batches; save SAELens folders, evals and a manifest.

    With a transcoder architecture (e.g. --preset transcoder), each captured input site (mlp_in, resid_mid or
    resid_pre) gets a transcoder predicting --target-site at its layer; capture both, e.g. --sites mlp_in,mlp_out."""
    from layerflow.capture import ActivationStore, CaptureConfig
    from layerflow.dictionaries.kinds import is_transcoder
    from layerflow.models.load import load_model
    from layerflow.models.sites import SiteKind, parse_kind, parse_layers
    from layerflow.models.zoo import get_spec
    from layerflow.train import LayerSchedule, TrainConfig, get_preset
    from layerflow.train import train as run_train

    schedule = LayerSchedule.from_dict(json.loads(schedule_file.read_text())) if schedule_file else get_preset(preset)
    if architecture or settings:
        schedule = schedule.with_overrides(architecture, dict(_parse_setting(s) for s in settings))
    online_cfg = None
    if online:
        out_dir = out_dir or Path("artifacts") / online / "train-online"
        store = out_dir.parent / (out_dir.name + "-heldout")  # the held-out split only, for the evals
        kinds = [SiteKind.mlp_in, parse_kind(target_site)] if is_transcoder(schedule.architecture) else [SiteKind.resid_post]
        online_cfg = CaptureConfig(online, parse_layers(layers, get_spec(online).n_layers, online), kinds, n_tokens=tokens,
                                   context_size=context_size, source=source, seed=seed)
        model_name = online
    elif store is None:
        raise LayerflowError("Give a capture directory to train from, or --online MODEL.")
    else:
        model_name = ActivationStore(store).manifest.model["name"]
    out_dir = out_dir or store.parent / "train"
    cfg = TrainConfig(str(store), hooks.split(",") if hooks else None, schedule, steps, epochs, batch_tokens,
                      exclude_special_tokens=not include_special_tokens, checkpoint_every=checkpoint_every, seed=seed,
                      online=online_cfg, transcoder_target=target_site, samples_every=samples_every,
                      dead_feature_window=dead_feature_window)
    loaded = None
    if model_eval or online:
        with err.status(f"loading {model_name}"):
            loaded = load_model(model_name)
    with render.progress("training", "steps") as report:
        manifest = run_train(cfg, out_dir, overwrite=overwrite, loaded=loaded, model_eval=model_eval, progress=report)
    rows = [s.evals | {"hook_name": s.hook_name} for s in manifest.sites if s.evals]
    what = "transcoders" if manifest.sites and manifest.sites[0].hook_name_out else "SAEs"
    render.site_table(f"{len(manifest.sites)} {what} ({schedule.architecture}) -> {out_dir}", rows)
    out.print(f"{manifest.steps} steps x {cfg.batch_tokens} tokens per site in {manifest.seconds:.0f} s; "
              f"held-out figures in {out_dir / 'evals.csv'}; SAELens folders in {out_dir / 'saes'}")


@app.command()
def samples(
    run_dir: Path = typer.Argument(..., help="A `layerflow train` run trained with --samples-every."),
    step: Optional[int] = typer.Option(None, help="Training step (default: the last recorded)."),
    hook: Optional[str] = typer.Option(None, help="Site (default: every site of the run)."),
    features: int = typer.Option(8, min=1, help="Latents to show per site: those with the largest activations."),
    contexts_per_feature: int = typer.Option(3, "--contexts", min=1, help="Top-activating contexts per latent."),
) -> None:
    """Show the top-activating held-out tokens of latents, as recorded during training."""
    from layerflow.capture import ActivationStore
    from layerflow.dictionaries.top_activations import contexts
    from layerflow.files import run_store
    from layerflow.models.load import load_tokenizer
    from layerflow.train import read_samples

    step, tops = read_samples(run_dir, step, [hook] if hook else None)
    store = ActivationStore(run_store(run_dir))
    tokenizer, tokens = load_tokenizer(store.manifest.model["name"]), store.tokens("heldout")
    render.samples_tables(step, tops, lambda top, feature: contexts(top, feature, tokens, tokenizer), features,
                          contexts_per_feature)


@app.command()
def compare(
    run_dir: Path = typer.Argument(..., help="A finished `layerflow train` run (SAEs or transcoders)."),
    layers: str = typer.Option(..., help="Layers to compare, e.g. '8,17'."),
    plot: Optional[Path] = typer.Option(None, help="Figure path stem (.png and .pdf).",
                                        show_default="<run>/plots/compare-L<a>-L<b>"),
) -> None:
    """Compare a run's dictionaries at a few layers: FVU by prefix, L0, dead/dense, frequencies, spliced CE/KL."""
    from layerflow.report import compare_layers, layer_comparison

    try:
        wanted = [int(x) for x in layers.split(",") if x.strip()]
    except ValueError:
        raise LayerflowError(f"--layers '{layers}' is not a comma-separated list of layer numbers, e.g. 8,17.") from None
    comparison = compare_layers(run_dir, wanted)
    render.site_table(f"{comparison.model}: layers {layers}", [s.evals.to_row() for s in comparison.sites])
    stem = plot or run_dir / "plots" / f"compare-{'-'.join(f'L{x}' for x in wanted)}"
    paths = layer_comparison(comparison, stem.with_suffix("") if stem.suffix in (".png", ".pdf") else stem)
    out.print(f"figure: {', '.join(str(p) for p in paths)}")


@app.command(name="eval")
def eval_command(
    saes: Path = typer.Argument(..., help="A training run directory, or a folder of SAELens SAE folders."),
    store: Optional[Path] = typer.Option(None, help="Capture with held-out activations (default: the run's own)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write evals.json/csv (default: SAES)."),
    include_special_tokens: bool = typer.Option(False, help="Count BOS/special positions too."),
    model_eval: bool = typer.Option(True, help="Run the model too: spliced CE/KL and out-of-domain FVU."),
    ood_tokens: int = typer.Option(defaults.OOD_TOKENS, min=0, help="Tokens of the shipped out-of-domain text for "
                                   "the out-of-domain FVU (0: none)."),
) -> None:
    """Evaluate SAEs on held-out tokens: FVU, L0, dead/dense, l2 ratio, spliced CE/KL, out-of-domain FVU."""
    from layerflow.evaluate import evaluate_run

    with err.status("evaluating"):
        results, written = evaluate_run(saes, store, out_dir, exclude_special_tokens=not include_special_tokens,
                                        model_eval=model_eval, ood_tokens=ood_tokens)
    render.site_table(f"{len(results)} SAEs on held-out tokens", [r.to_row() for r in results.values()])
    render.written(written)


@app.command()
def transfer(
    saes: Path = typer.Argument(..., help="A training run directory, or a folder of SAELens SAE (or transcoder) folders (with --store)."),
    store: Optional[Path] = typer.Option(None, help="Capture with held-out activations (default: the run's own)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder.", show_default="SAES/transfer"),
    hooks: Optional[str] = typer.Option(None, help="Comma-separated hook names (default: every SAE)."),
    max_tokens: int = typer.Option(defaults.TRANSFER_TOKENS, min=1, help="Held-out tokens per site."),
    top_k: int = typer.Option(defaults.TOP_K, min=1, help="Latents used by the notes' variance ratio, Spearman and decoder similarity."),
    match_distance: int = typer.Option(defaults.MATCH_DISTANCE, min=0, help="Hungarian feature matching for sites at most "
                                       "this far apart (0: none)."),
    include_special_tokens: bool = typer.Option(False, help="Count BOS/special positions too."),
    spliced: bool = typer.Option(False, help="Also splice each SAE into the model at every other site: delta CE and KL (one model pass per source per batch; slow)."),
    twins: Optional[Path] = typer.Option(None, help="SAEs of some of the same sites trained with another seed (a run's "
                                         "ceiling/<model> folder): the ceilings beside the figures. Floors are always computed."),
    cross_model: Optional[Path] = typer.Option(None, help="A second model's run: cross-model transfer, SAES' model -> this one's."),
    words: int = typer.Option(defaults.CROSS_MODEL_WORDS, min=10, help="With --cross-model: aligned words of the text source "
                              "(1 in 5 documents held out)."),
    source: str = typer.Option(defaults.SOURCE, help="With --cross-model: the text both models read."),
) -> None:
    """Apply every site's SAE to every other site's held-out activations: the full transfer matrix and its summaries.

    Transcoders (e.g. a `layerflow train --preset transcoder` run): transcoder i reads layer j's input site and is
    scored against layer j's target (mlp_out): how well layer i's MLP function predicts layer j's (docs/transfer.md).

    With --cross-model, apply each SAE of one model to the other model's sites through an affine stitch."""
    from layerflow.transfer import TransferOptions, cross_model_runs, same_depth_pairs, summarize_matrix, transfer_run
    from layerflow.transfer.summary import source_rows

    if cross_model is not None:
        with err.status("cross-model transfer: loading both models, reading aligned words, stitching"):
            matrix, written = cross_model_runs(saes, cross_model, out_dir, source=source, max_words=words,
                                               hooks_a=hooks.split(",") if hooks else None)
        render.cross_model_table(matrix, dict(same_depth_pairs(matrix)))
        render.written(written)
        return
    options = TransferOptions(max_tokens=max_tokens, top_k=top_k, match_distance=match_distance,
                              exclude_special_tokens=not include_special_tokens, spliced=spliced)
    with render.progress("transfer", "pairs") as report:
        matrix, written = transfer_run(saes, store, out_dir, options, hooks.split(",") if hooks else None,
                                       progress=report, twins=twins)
    render.transfer_table(matrix, source_rows(matrix))
    render.references(matrix.references)
    layers = [s.layer for s in matrix.sources]
    if len(set(layers)) == len(layers) > 1:
        render.transfer_summary(summarize_matrix(matrix))
    render.written(written)


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="Experiment config (TOML; see configs/). Default: the embedded model, all layers."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory.", show_default="artifacts/run-<config name>"),
    quick: bool = typer.Option(False, help="Smoke test: 4 layers per model, few tokens and steps (minutes)."),
    until: Optional[str] = typer.Option(None, help="Stop after this stage: capture, train, eval, transfer, cross_model, report."),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
) -> None:
    """The whole study from one config: capture, train, eval, transfer, cross-model, plots and report.md.

    Rerun the same command to resume: finished stages are skipped, judged by their manifests."""
    from layerflow.experiment import load_config

    cfg = load_config(config)  # before the pipeline loads the library: a config's own errors come back at once
    cfg = cfg.quick() if quick else cfg
    from layerflow.files import REPORT_FILE
    from layerflow.pipeline import STAGES, run_experiment

    out_dir = out_dir or Path("artifacts") / f"run-{cfg.name}"
    stages = STAGES[:STAGES.index(until) + 1] if until in STAGES else STAGES
    with render.stage_progress(stages) as report:
        record = run_experiment(cfg, out_dir, until=until, overwrite=overwrite, progress=report)
    render.run_table(f"{cfg.name}: {', '.join(m.name for m in cfg.models)} -> {out_dir}", record, out_dir,
                     out_dir / REPORT_FILE)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A `layerflow run` directory.")) -> None:
    """Redraw the plots and rewrite summary.json and report.md from a run's files."""
    from layerflow.pipeline import write_outputs

    with err.status("plotting and writing the report"):
        written = write_outputs(run_dir)
    out.print(f"{sum(len(p) for p in written['plots'].values())} plot files in {run_dir / 'plots'}; "
              f"{written['summary']}; {written['report']}")


def _parse_token(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise LayerflowError(f"--token '{text}' is not a position: give an integer (e.g. -1 for the last) or 'all'.") from None


@app.command(name="trace")
def trace_command(
    run_dir: Path = typer.Option(..., "--run", help="A `layerflow run` directory."),
    prompt: str = typer.Option(..., help="The text to trace."),
    token: str = typer.Option("-1", help="Token position to report (negative from the end), or 'all'."),
    top_k: int = typer.Option(defaults.TRACE_TOP_K, min=1, help="Features per layer."),
    model: list[str] = typer.Option([], "--model", help="Trace only this model of the run (repeatable; default: all)."),
    out_json: Optional[Path] = typer.Option(None, "--out", help="Write the trace as JSON here."),
    plot: Optional[Path] = typer.Option(None, help="Draw the layers x features flow here (PNG and PDF)."),
    chains: int = typer.Option(10, min=0, help="Trajectories listed per token."),
) -> None:
    """Follow a prompt's SAE features through the layers: top features per layer with descriptions, and their trajectories."""
    from layerflow.features import trace
    from layerflow.report import trace_flow

    with err.status("tracing (the first trace of a run also caches feature descriptions)"):
        result = trace(run_dir, prompt, _parse_token(token), top_k, model or None)
    render.trace_tables(result, top_k, chains)
    if out_json:
        out.print(f"written: {result.write(out_json)}")
    if plot:
        stem = plot.with_suffix("") if plot.suffix in (".png", ".pdf") else plot
        if any(len(m.positions) > 1 for m in result.models.values()):
            render.note("the figure shows the last traced token.")
        out.print(f"figure: {', '.join(str(p) for p in trace_flow(result, stem))}")


@app.command(name="intervene")
def intervene_command(
    run_dir: Path = typer.Option(..., "--run", help="A `layerflow run` directory."),
    layer: str = typer.Option(..., help="Layer of the SAE to edit (or its hook name); with --batch also 'all' or a list '3,7'."),
    feature: Optional[str] = typer.Option(None, help="Feature id(s) to edit, comma-separated (not with --batch)."),
    mode: str = typer.Option("ablate", help="ablate, scale, clamp or steer (adds VALUE x the decoder direction)."),
    value: Optional[float] = typer.Option(None, help="The factor (scale), the activation (clamp) or the amount (steer)."),
    prompt: Optional[str] = typer.Option(None, help="Measure downstream features, logits and KL on this text."),
    tokens: Optional[str] = typer.Option(None, help="Comma-separated tokens whose logits to compare, e.g. ' Paris, London'."),
    token: int = typer.Option(-1, help="Token position of the prompt to measure at."),
    batch: Optional[int] = typer.Option(None, help="Ablate each of the top N features at the layer(s) and rank them by effect."),
    heldout_tokens: int = typer.Option(defaults.INTERVENE_HELDOUT_TOKENS, min=0, help="Held-out tokens for the CE/KL change (0: none)."),
    top_n: int = typer.Option(defaults.INTERVENE_TOP_N, min=1, help="Downstream features listed per layer."),
    model: Optional[str] = typer.Option(None, help="The model of the run (needed when it holds several)."),
    out_json: Optional[Path] = typer.Option(None, "--out", help="Write the result as JSON here."),
) -> None:
    """Ablate, scale, clamp or steer SAE features (the SAE's error term kept) and measure what changes downstream."""
    from layerflow.features import RunSAEs, intervene, rank_features
    from layerflow.files import write_json

    run_saes = RunSAEs.open(run_dir, model)
    if batch is not None:
        if feature is not None:
            raise LayerflowError("--batch picks the features itself: leave out --feature.")
        layers = run_saes.hooks if layer == "all" else [p.strip() for p in layer.split(",") if p.strip()]
        with render.hook_progress("ablating", "batches") as report:
            ranking = rank_features(run_saes, layers, batch, prompt, token, heldout_tokens, progress=report)
        render.ranking(ranking)
        if out_json:
            render.written([write_json(out_json, ranking.to_dict(), indent=1)])
        return
    if feature is None:
        raise LayerflowError("Give --feature (the id(s) to edit), or --batch N to rank the top N features.")
    try:
        features = [int(f) for f in feature.split(",") if f.strip()]
    except ValueError:
        raise LayerflowError(f"--feature '{feature}' is not a comma-separated list of integer ids.") from None
    strings = [t for t in tokens.split(",") if t] if tokens else None
    with err.status("intervening"):
        result = intervene(run_saes, layer, features, mode, value, prompt, strings, token, heldout_tokens, top_n)
    render.intervention(result)
    if out_json:
        render.written([write_json(out_json, result.to_dict(), indent=1)])


def main() -> None:
    try:
        app()
    except LayerflowError as e:
        render.error(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted: finished shards and the last checkpoint are kept; rerun the same command to resume.")
        sys.exit(130)


if __name__ == "__main__":
    main()
