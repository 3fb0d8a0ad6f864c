"""The `layerflow` command: a thin Typer front-end over the library. All rendering happens here."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from layerflow.errors import LayerflowError
from layerflow.models.zoo import DEFAULT_MODEL, ZOO

app = typer.Typer(
    help="Study how sparse-dictionary features form and transfer across layers and models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Piped or logged output (not a terminal) gets wide tables rather than rich's 80-column default,
# which truncates the columns of a site table to a few characters.
out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
err = Console(stderr=True)


@app.command()
def models() -> None:
    """List the model zoo: shapes, tokenizer and where the weights come from."""
    table = Table(title="layerflow model zoo")
    for col in ("name", "family", "layers", "d_model", "d_mlp", "tokenizer", "weights"):
        table.add_column(col, justify="right" if col in ("layers", "d_model", "d_mlp") else "left")
    for spec in ZOO.values():
        name = f"{spec.name} (default)" if spec.name == DEFAULT_MODEL else spec.name
        table.add_row(name, spec.family, str(spec.n_layers), str(spec.d_model), str(spec.d_mlp),
                      spec.tokenizer, f"[{spec.source}] {spec.weights}")
    out.print(table)


@app.command()
def sites(model: str = typer.Argument(DEFAULT_MODEL, help="Zoo model name (see `layerflow models`).")) -> None:
    """Show every site kind of a model, the TransformerLens hook it resolves to, or why it is impossible."""
    from layerflow.models.load import model_config
    from layerflow.models.sites import KIND_DESCRIPTIONS, Site, SiteKind, unavailable_reason

    cfg = model_config(model)
    traits = [f"{cfg.n_layers} layers", f"d_model {cfg.d_model}", f"{cfg.normalization_type} norm"]
    if cfg.parallel_attn_mlp:
        traits.append("parallel attention+MLP")
    if cfg.use_normalization_before_and_after:
        traits.append("post-norms")
    table = Table(title=f"sites of {model} ({', '.join(traits)})")
    for col in ("kind", "hook (layer L)", "meaning"):
        table.add_column(col)
    for kind in SiteKind:
        reason = unavailable_reason(cfg, kind)
        hook = Site(0, kind).hook_name.replace("blocks.0.", "blocks.{L}.")
        table.add_row(kind.value, "[dim]-[/dim]" if reason else hook, f"[red]{reason}[/red]" if reason else KIND_DESCRIPTIONS[kind])
    out.print(table)


@app.command()
def capture(
    model: str = typer.Argument(DEFAULT_MODEL, help="Zoo model name (see `layerflow models`)."),
    layers: str = typer.Option("all", help="'all', a slice like '0:30:2', or a list like '3,7,11'."),
    site: str = typer.Option("resid_post", "--sites", help="Comma-separated site kinds (see `layerflow sites`)."),
    tokens: int = typer.Option(20_000, min=1, help="Total tokens to capture (train + held-out)."),
    context_size: int = typer.Option(128, min=2, help="Tokens per sequence, BOS included."),
    source: str = typer.Option("default", help="'default' (shipped corpus), a .txt/.txt.gz path, hf:DATASET[:CONFIG], or 'random'."),
    holdout: float = typer.Option(0.1, help="Fraction of sequences kept as held-out."),
    prepend_bos: bool = typer.Option(True, help="Start every sequence with the BOS token."),
    dtype: str = typer.Option("float32", help="Storage dtype: float32, bfloat16 or float16."),
    batch_size: int = typer.Option(8, min=1, help="Sequences per forward pass."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output directory.", show_default="artifacts/<model>/capture"),
    overwrite: bool = typer.Option(False, help="Replace a different capture already in --out."),
    seed: int = typer.Option(0, help="Seed for sampling sequences."),
    device: str = typer.Option("cpu", help="Torch device."),
) -> None:
    """Capture many layers in one forward pass per batch, streamed to disk in shards (resumable)."""
    from layerflow.capture.writer import CaptureConfig
    from layerflow.capture.writer import capture as run_capture
    from layerflow.models.load import load_model
    from layerflow.models.sites import parse_kind, parse_layers
    from layerflow.models.zoo import get_spec

    spec = get_spec(model)
    layer_list = parse_layers(layers, spec.n_layers, model)
    kinds = [parse_kind(k.strip()) for k in site.split(",") if k.strip()]
    out_dir = out_dir or Path("artifacts") / model / "capture"
    cfg = CaptureConfig(model, layer_list, kinds, n_tokens=tokens, context_size=context_size,
                        prepend_bos=prepend_bos, source=source, holdout_fraction=holdout, dtype=dtype,
                        batch_size=batch_size, seed=seed, device=device)
    with err.status(f"loading {model}"):
        loaded = load_model(model, device=device)
    started = time.perf_counter()
    with Progress(TextColumn("capturing"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("capture", total=None)
        manifest = run_capture(cfg, out_dir, overwrite=overwrite, loaded=loaded,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    elapsed = time.perf_counter() - started
    table = Table(title=f"{model}: {manifest.n_tokens} tokens x {len(manifest.sites)} sites -> {out_dir}")
    for col in ("site", "hook", "d", "mean ||x||"):
        table.add_column(col, justify="right" if col in ("d", "mean ||x||") else "left")
    for s in manifest.sites:
        table.add_row(str(s), s.hook_name, str(s.d), f"{manifest.mean_norm[s.hook_name]:.2f}")
    out.print(table)
    norms = [(s.layer, manifest.mean_norm[s.hook_name]) for s in manifest.sites if s.kind == "resid_post"]
    if len(norms) > 1:
        (first, n_first), (last, n_last) = norms[0], norms[-1]
        out.print(f"resid_post norm grows {n_last / n_first:.1f}x from L{first} to L{last}: compare layers with "
                  "scale-free metrics (FVU), not raw MSE.")
    split = manifest.split
    out.print(f"train {split['train_tokens']} tokens, held-out {split['heldout_tokens']} tokens, "
              f"{len(manifest.shards)} shards, {manifest.n_tokens / max(elapsed, 1e-9):.0f} tokens/s this run "
              f"(mean norms exclude special-token positions)")


def _parse_setting(text: str) -> tuple[str, object]:
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise LayerflowError(f"--set '{text}' is not KEY=VALUE (e.g. --set k=64 or --set lr=1e-3).")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _short_hook(hook: str) -> str:
    """blocks.3.hook_resid_post -> 3.resid_post: site labels that fit a table column."""
    return hook.removeprefix("blocks.").replace(".mlp.hook_in", ".mlp_in").replace(".hook_", ".")


def _site_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    columns = [("site", "hook_name"), ("predicts", "hook_name_out"), ("FVU", "fvu"), ("prefix FVU", "prefix_fvu"), ("L0", "l0"), ("dead", "dead_fraction"), ("dense", "dense_fraction"),
               ("l2 ratio", "l2_ratio"), ("CE score", "ce_loss_score"), ("dCE nats", "delta_ce"), ("KL", "kl_div")]
    present = [(name, key) for name, key in columns if any(r.get(key) is not None for r in rows)]
    for name, _ in present:
        table.add_column(name, justify="left" if name == "site" else "right")
    for r in rows:
        table.add_row(*[_cell(key, r.get(key)) for _, key in present])
    return table


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key.startswith("hook_name"):
        return _short_hook(value)
    if isinstance(value, list):
        return ">".join(f"{v:.2f}" for v in value)
    return f"{value:.3g}"


@app.command()
def train(
    store: Optional[Path] = typer.Argument(None, help="A capture directory (from `layerflow capture`); omit with --online."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory.", show_default="<store>/../train"),
    online: Optional[str] = typer.Option(None, help="Train from live forwards of this zoo model instead of a store."),
    layers: str = typer.Option("all", help="With --online: layers, as for `capture`."),
    tokens: int = typer.Option(20_000, min=1, help="With --online: tokens (train + held-out), as for `capture`."),
    context_size: int = typer.Option(128, min=2, help="With --online: tokens per sequence."),
    source: str = typer.Option("default", help="With --online: text source, as for `capture`."),
    preset: str = typer.Option("default", help="Schedule preset: 'default' (BatchTopK k=32, 8x), 'notes' (L1 by depth) "
                               "or 'transcoder' (the notes' Matryoshka transcoder: input site -> mlp_out, 2x, k=48)."),
    schedule_file: Optional[Path] = typer.Option(None, "--schedule", help="A LayerSchedule JSON file (overrides --preset)."),
    architecture: Optional[str] = typer.Option(None, help="Override the schedule's SAE architecture."),
    settings: list[str] = typer.Option([], "--set", help="Override a hyperparameter at every depth, e.g. --set k=64."),
    hooks: Optional[str] = typer.Option(None, help="Comma-separated hook names to train (default: every captured site)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Optimizer steps (default: --epochs over the training tokens)."),
    epochs: float = typer.Option(1.0, min=0.0, help="Passes over the captured training tokens when --steps is not given."),
    batch_tokens: int = typer.Option(4096, min=1, help="Tokens per step (every site sees the same tokens)."),
    include_special_tokens: bool = typer.Option(False, help="Train and evaluate on BOS/special positions too."),
    checkpoint_every: int = typer.Option(500, min=1, help="Steps between checkpoints (resume picks the last)."),
    samples_every: int = typer.Option(0, min=0, help="Every N steps, keep each latent's top-activating held-out tokens "
                                      "(see `layerflow samples`); 0: never."),
    target_site: str = typer.Option("mlp_out", help="Transcoders: the site kind each input site's transcoder predicts."),
    dead_feature_window: int = typer.Option(1000, min=1, help="Steps without firing before a latent counts as dead "
                                            "(TopK-family AuxK revives dead latents only after this many steps)."),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, help="Replace a different run already in --out."),
    model_eval: bool = typer.Option(True, help="Also splice the SAEs into the model for CE/KL at the end."),
) -> None:
    """Train one SAE (or transcoder) per captured site from the same batches; save SAELens folders, evals and a manifest.

    With a transcoder architecture (e.g. --preset transcoder), each captured input site (mlp_in, resid_mid or
    resid_pre) gets a transcoder predicting --target-site at its layer; capture both, e.g. --sites mlp_in,mlp_out."""
    import json

    from layerflow.capture.store import ActivationStore
    from layerflow.train.config import TrainConfig
    from layerflow.train.schedule import LayerSchedule, get_preset
    from layerflow.train.trainer import train as run_train

    schedule = LayerSchedule.from_dict(json.loads(schedule_file.read_text())) if schedule_file else get_preset(preset)
    if architecture or settings:
        schedule = schedule.with_overrides(architecture, dict(_parse_setting(s) for s in settings))
    online_cfg = None
    if online:
        from layerflow.capture.writer import CaptureConfig
        from layerflow.models.sites import parse_layers
        from layerflow.models.zoo import get_spec

        out_dir = out_dir or Path("artifacts") / online / "train-online"
        store = out_dir.parent / (out_dir.name + "-heldout")  # the held-out split only, for the evals
        from layerflow.dictionaries.kinds import is_transcoder
        from layerflow.models.sites import SiteKind, parse_kind

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
        from layerflow.models.load import load_model

        with err.status(f"loading {model_name}"):
            loaded = load_model(model_name)
    with Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("train", total=None)
        manifest = run_train(cfg, out_dir, overwrite=overwrite, loaded=loaded, model_eval=model_eval,
                             progress=lambda done, total: bar.update(task, completed=done, total=total))
    rows = [s.evals | {"hook_name": s.hook_name} for s in manifest.sites if s.evals]
    what = "transcoders" if manifest.sites and manifest.sites[0].hook_name_out else "SAEs"
    out.print(_site_table(f"{len(manifest.sites)} {what} ({schedule.architecture}) -> {out_dir}", rows))
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
    from layerflow.capture.store import ActivationStore
    from layerflow.dictionaries.top_activations import contexts
    from layerflow.files import run_store
    from layerflow.models.load import load_tokenizer
    from layerflow.train.samples import read_samples

    step, tops = read_samples(run_dir, step, [hook] if hook else None)
    store = ActivationStore(run_store(run_dir))
    tokenizer, tokens = load_tokenizer(store.manifest.model["name"]), store.tokens("heldout")
    for name, top in tops.items():
        table = Table(title=f"{_short_hook(name)} at step {step}: top-activating held-out tokens")
        table.add_column("latent", justify="right")
        table.add_column("activation", justify="right")
        table.add_column(escape("context ([[firing token]])"), overflow="fold")
        for feature in top.top_features(features):
            for i, c in enumerate(contexts(top, feature, tokens, tokenizer)[:contexts_per_feature]):
                table.add_row(str(feature) if i == 0 else "", f"{c.activation:.3g}", escape(c.text().replace("\n", "\\n")))
        out.print(table)


@app.command()
def compare(
    run_dir: Path = typer.Argument(..., help="A finished `layerflow train` run (SAEs or transcoders)."),
    layers: str = typer.Option(..., help="Layers to compare, e.g. '8,17'."),
    plot: Optional[Path] = typer.Option(None, help="Figure path stem (.png and .pdf).",
                                        show_default="<run>/plots/compare-L<a>-L<b>"),
) -> None:
    """Compare a run's dictionaries at a few layers: FVU by prefix, L0, dead/dense, frequencies, spliced CE/KL."""
    from layerflow.report.compare import compare_layers
    from layerflow.report.plots import layer_comparison

    try:
        wanted = [int(x) for x in layers.split(",") if x.strip()]
    except ValueError:
        raise LayerflowError(f"--layers '{layers}' is not a comma-separated list of layer numbers, e.g. 8,17.") from None
    comparison = compare_layers(run_dir, wanted)
    out.print(_site_table(f"{comparison.model}: layers {layers}", [s.evals.to_row() for s in comparison.sites]))
    stem = plot or run_dir / "plots" / f"compare-{'-'.join(f'L{x}' for x in wanted)}"
    paths = layer_comparison(comparison, stem.with_suffix("") if stem.suffix in (".png", ".pdf") else stem)
    out.print(f"figure: {', '.join(str(p) for p in paths)}")


@app.command(name="eval")
def eval_command(
    saes: Path = typer.Argument(..., help="A training run directory, or a folder of SAELens SAE folders."),
    store: Optional[Path] = typer.Option(None, help="Capture with held-out activations (default: the run's own)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write evals.json/csv (default: SAES)."),
    include_special_tokens: bool = typer.Option(False, help="Count BOS/special positions too."),
    model_eval: bool = typer.Option(True, help="Splice the SAEs into the model for CE/KL."),
) -> None:
    """Evaluate SAEs on held-out tokens: FVU, L0, dead/dense, l2 ratio, and spliced CE/KL."""
    from layerflow.evaluate.evals import evaluate_run

    with err.status("evaluating"):
        results, written = evaluate_run(saes, store, out_dir, exclude_special_tokens=not include_special_tokens,
                                        model_eval=model_eval)
    out.print(_site_table(f"{len(results)} SAEs on held-out tokens", [r.to_row() for r in results.values()]))
    out.print(f"written: {', '.join(str(p) for p in written)}")


@app.command()
def transfer(
    saes: Path = typer.Argument(..., help="A training run directory, or a folder of SAELens SAE (or transcoder) folders (with --store)."),
    store: Optional[Path] = typer.Option(None, help="Capture with held-out activations (default: the run's own)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder.", show_default="SAES/transfer"),
    hooks: Optional[str] = typer.Option(None, help="Comma-separated hook names (default: every SAE)."),
    max_tokens: int = typer.Option(8192, min=1, help="Held-out tokens per site."),
    top_k: int = typer.Option(50, min=1, help="Latents used by the notes' variance ratio, Spearman and decoder similarity."),
    match_distance: int = typer.Option(1, min=0, help="Hungarian feature matching for sites at most this far apart (0: none)."),
    include_special_tokens: bool = typer.Option(False, help="Count BOS/special positions too."),
    spliced: bool = typer.Option(False, help="Also splice each SAE into the model at every other site: delta CE and KL (one model pass per source per batch; slow)."),
    cross_model: Optional[Path] = typer.Option(None, help="A second model's run: cross-model transfer, SAES' model -> this one's."),
    words: int = typer.Option(20_000, min=10, help="With --cross-model: aligned words of the text source (1 in 5 documents held out)."),
    source: str = typer.Option("default", help="With --cross-model: the text both models read."),
) -> None:
    """Apply every site's SAE to every other site's held-out activations: the full transfer matrix and its summaries.

    Transcoders (e.g. a `layerflow train --preset transcoder` run): transcoder i reads layer j's input site and is
    scored against layer j's target (mlp_out): how well layer i's MLP function predicts layer j's (docs/transfer.md).

    With --cross-model, apply each SAE of one model to the other model's sites through an affine stitch."""
    from layerflow.transfer.runs import transfer_run
    from layerflow.transfer.within import TransferOptions

    if cross_model is not None:
        from layerflow.transfer.runs import cross_model_runs

        with err.status("cross-model transfer: loading both models, reading aligned words, stitching"):
            matrix, written = cross_model_runs(saes, cross_model, out_dir, source=source, max_words=words,
                                               hooks_a=hooks.split(",") if hooks else None)
        out.print(_cross_model_table(matrix))
        out.print(f"written: {', '.join(str(p) for p in written)}")
        return

    options = TransferOptions(max_tokens=max_tokens, top_k=top_k, match_distance=match_distance,
                              exclude_special_tokens=not include_special_tokens, spliced=spliced)
    with Progress(TextColumn("transfer"), BarColumn(), MofNCompleteColumn(), TextColumn("pairs"),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("transfer", total=None)
        matrix, written = transfer_run(saes, store, out_dir, options, hooks.split(",") if hooks else None,
                                       progress=lambda done, total: bar.update(task, completed=done, total=total))
    out.print(_transfer_table(matrix))
    layers = [s.layer for s in matrix.sources]
    if len(set(layers)) == len(layers) > 1:
        from layerflow.transfer.summary import summarize

        for metric in ("relative_transfer", "transfer_recon_ratio"):
            s = summarize(matrix[metric], layers, matrix.sources[0].n_layers, metric)
            divergence = "none" if s.divergence_layer is None else f"layer {s.divergence_layer}"
            out.print(f"[bold]{metric}[/bold]: off-diagonal mean {s.mean:.3f} (min {s.min:.3f}, max {s.max:.3f}); "
                      f"hub layers {s.hub_layers or 'none'}; {len(s.bidirectional_pairs)} strong bidirectional pairs "
                      f"(>= {s.strong_threshold}); decay {s.decay_rate:.4f} per layer; divergence {divergence}")
    out.print(f"written: {', '.join(str(p) for p in written)}")


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="Experiment config (TOML; see configs/). Default: the embedded model, all layers."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory.", show_default="artifacts/run-<config name>"),
    quick: bool = typer.Option(False, help="Smoke test: 4 layers per model, few tokens and steps (minutes)."),
    until: Optional[str] = typer.Option(None, help="Stop after this stage: capture, train, eval, transfer, cross_model, report."),
    overwrite: bool = typer.Option(False, help="Start again in a run directory that holds a run with another config."),
) -> None:
    """The whole study from one config: capture, train, eval, transfer, cross-model, plots and report.md.

    Rerun the same command to resume: finished stages are skipped, judged by their manifests."""
    from layerflow.experiment import load_config
    from layerflow.pipeline import STAGES, run_experiment

    cfg = load_config(config)
    cfg = cfg.quick() if quick else cfg
    out_dir = out_dir or Path("artifacts") / f"run-{cfg.name}"
    stages = STAGES[:STAGES.index(until) + 1] if until in STAGES else STAGES
    with Progress(TextColumn("[{task.fields[step]}/{task.fields[of]}] {task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("starting", total=None, step=0, of=len(stages))

        def show(stage: str, item: str, done: int, total: int | None) -> None:
            unit = {"capture": "tokens", "train": "steps", "transfer": "pairs"}.get(stage, "")
            bar.update(task, description=f"{stage} {item} {unit}".rstrip(), completed=done, total=total,
                       step=stages.index(stage) + 1)

        record = run_experiment(cfg, out_dir, until=until, overwrite=overwrite, progress=show)
    table = Table(title=f"{cfg.name}: {', '.join(m.name for m in cfg.models)} -> {out_dir}")
    for col in ("stage", "status", "wall time"):
        table.add_column(col, justify="right" if col == "wall time" else "left")
    for stage, info in record["stages"].items():
        status = info["status"] if info.get("last_invocation", "ran") == "ran" else info["last_invocation"]
        seconds = f"{info['seconds']:.0f} s" if "seconds" in info else "-"
        table.add_row(stage, status, seconds)
    out.print(table)
    if (out_dir / "report.md").exists():
        out.print(f"report: {out_dir / 'report.md'}; plots in {out_dir / 'plots'}; figures in {out_dir / 'summary.json'}")


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


def _promoted(description) -> str:
    return " ".join(repr(t) for t in description.promoted_tokens[:3]) if description else ""


@app.command(name="trace")
def trace_command(
    run_dir: Path = typer.Option(..., "--run", help="A `layerflow run` directory."),
    prompt: str = typer.Option(..., help="The text to trace."),
    token: str = typer.Option("-1", help="Token position to report (negative from the end), or 'all'."),
    top_k: int = typer.Option(5, min=1, help="Features per layer."),
    model: list[str] = typer.Option([], "--model", help="Trace only this model of the run (repeatable; default: all)."),
    out_json: Optional[Path] = typer.Option(None, "--out", help="Write the trace as JSON here."),
    plot: Optional[Path] = typer.Option(None, help="Draw the layers x features flow here (PNG and PDF)."),
    chains: int = typer.Option(10, min=0, help="Trajectories listed per token."),
) -> None:
    """Follow a prompt's SAE features through the layers: top features per layer with descriptions, and their trajectories."""
    from layerflow.features.trace import trace

    with err.status("tracing (the first trace of a run also caches feature descriptions)"):
        result = trace(run_dir, prompt, _parse_token(token), top_k, model or None)
    for m in result.models.values():
        for note in m.notes:
            err.print(f"[yellow]note:[/yellow] {escape(note)}")
        for t in m.positions:
            table = Table(title=f"{m.model}: top {top_k} features per layer at token {t.token!r} (position {t.position})")
            for col in ("layer", "feature", "act", "density", "top held-out context", "promotes"):
                table.add_column(col, justify="right" if col in ("layer", "feature", "act", "density") else "left",
                                 overflow="fold")
            for layer in t.layers:
                for i, hit in enumerate(layer.top):
                    d = m.description(layer.hook, hit.feature)
                    table.add_row(f"L{layer.layer}" if i == 0 else "", str(hit.feature), f"{hit.activation:.2f}",
                                  f"{d.density:.2%}" if d else "-", escape(d.snippet() if d else ""), escape(_promoted(d)),
                                  end_section=i == len(layer.top) - 1)
            out.print(table)
            persisting = [c for c in t.trajectories if c.persists]
            chains_table = Table(title=f"{m.model}: {len(persisting)} of {len(t.trajectories)} trajectories persist "
                                       f"over 2+ SAE sites (matched features, longest first)")
            for col in ("sites", "chain (layer:feature)", "ends", "first feature's context"):
                chains_table.add_column(col, justify="right" if col == "sites" else "left", overflow="fold")
            for c in persisting[:chains]:
                first = m.description(c.steps[0].hook, c.steps[0].feature)
                chains_table.add_row(str(len(c.steps)), c.label(), escape(c.end), escape(first.snippet() if first else ""))
            out.print(chains_table)
    if out_json:
        out.print(f"written: {result.write(out_json)}")
    if plot:
        from layerflow.report.plots import trace_flow

        stem = plot.with_suffix("") if plot.suffix in (".png", ".pdf") else plot
        for name, m in result.models.items():
            if len(m.positions) > 1:
                err.print("[yellow]note:[/yellow] the figure shows the last traced token.")
                break
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
    heldout_tokens: int = typer.Option(1024, min=0, help="Held-out tokens for the CE/KL change (0: none)."),
    top_n: int = typer.Option(5, min=1, help="Downstream features listed per layer."),
    model: Optional[str] = typer.Option(None, help="The model of the run (needed when it holds several)."),
    out_json: Optional[Path] = typer.Option(None, "--out", help="Write the result as JSON here."),
) -> None:
    """Ablate, scale, clamp or steer SAE features (the SAE's error term kept) and measure what changes downstream."""
    from layerflow.features.intervene import intervene, rank_features
    from layerflow.features.run_saes import RunSAEs
    from layerflow.files import write_json

    run_saes = RunSAEs.open(run_dir, model)
    if batch is not None:
        if feature is not None:
            raise LayerflowError("--batch picks the features itself: leave out --feature.")
        layers = run_saes.hooks if layer == "all" else [p.strip() for p in layer.split(",") if p.strip()]
        with Progress(TextColumn("ablating [{task.fields[hook]}]"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("batches"), console=err, transient=True) as bar:
            task = bar.add_task("rank", total=None, hook="")
            ranking = rank_features(run_saes, layers, batch, prompt, token, heldout_tokens,
                                    progress=lambda hook, done, total: bar.update(task, completed=done, total=total,
                                                                                   hook=hook))
        _print_ranking(ranking)
        if out_json:
            out.print(f"written: {write_json(out_json, ranking.to_dict(), indent=1)}")
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
    _print_intervention(result)
    if out_json:
        out.print(f"written: {write_json(out_json, result.to_dict(), indent=1)}")


def _print_intervention(r) -> None:
    edits = ", ".join(f"{e.mode} {e.feature}" + (f" ({e.value:g})" if e.value is not None else "") for e in r.edits)
    out.print(f"[bold]{r.model}[/bold] L{r.layer} ({r.hook}): {edits}, through the SAE with its error term kept")
    for e in r.edits:
        d = r.descriptions.get(r.hook, {}).get(e.feature)
        active = f"; activation {r.clean_activation[e.feature]:.3f} at token {r.token!r}" if e.feature in r.clean_activation else ""
        if d:
            out.print(f"  feature {e.feature}: density {d.density:.2%}{active}; {escape(d.snippet(60))}; promotes "
                      f"{escape(_promoted(d))}")
    if r.prompt is not None:
        if r.clean_activation and all(v == 0 for v in r.clean_activation.values()) and all(e.mode in ("ablate", "scale") for e in r.edits):
            out.print(f"  [yellow]the edited feature(s) are inactive at token {r.token!r}: nothing changes there[/yellow]")
        table = Table(title=f"downstream features at token {r.token!r} (position {r.position}), largest |change| first")
        for col in ("layer", "features changed", "sum |change|", "largest changes (feature: clean -> edited)"):
            table.add_column(col, justify="left" if col.startswith("largest") else "right", overflow="fold")
        for layer in r.downstream:
            described = r.descriptions.get(layer.hook, {})
            changes = "; ".join(f"{c.feature}: {c.clean:.2f} -> {c.edited:.2f}"
                                + (f" {_promoted(described.get(c.feature))}" if described.get(c.feature) else "")
                                for c in layer.changes[:3])
            table.add_row(f"L{layer.layer}", str(layer.n_changed), f"{layer.total_abs_change:.3f}", escape(changes))
        out.print(table)
        if r.logits:
            logits = Table(title=f"logits at token {r.token!r}")
            for col in ("token", "clean", "edited", "change"):
                logits.add_column(col, justify="left" if col == "token" else "right")
            for t in r.logits:
                logits.add_row(escape(repr(t.token)), f"{t.clean:.3f}", f"{t.edited:.3f}", f"{t.edited - t.clean:+.3f}")
            out.print(logits)
            if r.logit_difference:
                (clean, edited), (a, b) = r.logit_difference, r.logits[:2]
                out.print(f"logit difference {a.token!r} - {b.token!r}: {clean:.3f} -> {edited:.3f} ({edited - clean:+.3f})")
        out.print(f"KL(clean || edited) of the next token: {r.kl_at_token:.4g} at token {r.token!r}, "
                  f"{r.kl_prompt_mean:.4g} mean over the prompt")
    if r.heldout is not None:
        h = r.heldout
        out.print(f"held-out text ({h.n_tokens} predictions): CE {h.ce_clean:.4f} -> {h.ce_edited:.4f} nats "
                  f"({h.delta_ce:+.4f}); mean KL {h.kl_mean:.4g}; feature(s) active at {h.active_fraction:.1%} of "
                  f"positions, KL there {h.kl_when_active:.4g}")


def _print_ranking(ranking) -> None:
    for layer in ranking.layers:
        table = Table(title=f"{ranking.model} L{layer.layer}: {ranking.selection}, each ablated alone, "
                            f"ranked by mean held-out KL ({ranking.heldout_tokens} tokens)")
        for col in ("rank", "feature", "density", "KL mean", "KL when active", "dCE nats", "on prompt", "top held-out context"):
            table.add_column(col, justify="left" if col == "top held-out context" else "right", overflow="fold")
        for i, f in enumerate(layer.features):
            e = f.effect
            table.add_row(str(i + 1), str(f.feature), f"{f.density:.2%}", f"{e.kl_mean:.3g}", f"{e.kl_when_active:.3g}",
                          f"{e.delta_ce:+.4f}", "-" if f.prompt_activation is None else f"{f.prompt_activation:.2f}",
                          escape(f.description.snippet() if f.description else ""))
        out.print(table)

        def rho(value) -> str:
            return "n/a (fewer than 3 features, or constant)" if value is None else f"{value:+.2f}"

        out.print(f"L{layer.layer} selectivity vs importance, Spearman over {len(layer.features)} features: density vs "
                  f"mean KL {rho(layer.spearman_density_kl)}; density vs KL when active "
                  f"{rho(layer.spearman_density_kl_when_active)}")


def _cross_model_table(matrix) -> Table:
    """Per source site: the target site it explains best (relative transfer), and same-depth figures."""
    import numpy as np

    from layerflow.transfer.cross_model import same_depth_pairs

    same = dict(same_depth_pairs(matrix))
    rel, cka = matrix["relative_transfer"], matrix["cka"]
    table = Table(title=f"{matrix.settings['model_a']} SAEs -> {matrix.settings['model_b']} sites "
                        f"({matrix.settings['n_heldout_words']} held-out words)")
    for col in ("source", "depth", "same-depth target", "rel. transfer", "CKA", "best target", "rel. transfer "):
        label = col in ("source", "same-depth target", "best target")
        table.add_column(col, justify="left" if label else "right", no_wrap=label)
    for i, site in enumerate(matrix.sources):
        j, best = same[i], int(np.nanargmax(rel[i])) if np.isfinite(rel[i]).any() else same[i]
        table.add_row(_short_hook(site.hook_name), f"{site.relative_depth:.2f}", _short_hook(matrix.targets[j].hook_name),
                      f"{rel[i, j]:.3f}", f"{cka[i, j]:.3f}", _short_hook(matrix.targets[best].hook_name), f"{rel[i, best]:.3f}")
    return table


def _transfer_table(matrix) -> Table:
    """Per source site: its own EV, and the mean over the other sites of the main transfer figures."""
    import numpy as np

    n = len(matrix.sources)
    off = ~np.eye(n, dtype=bool)
    table = Table(title=f"{matrix.sources[0].model}: {n} x {n} sites, {matrix.settings['n_tokens']} held-out tokens each",
                  caption="means over the other sites, with this site's SAE as the source")
    columns = [("own EV", "explained_variance", True), ("relative transfer", "relative_transfer", False),
               ("beyond persistence", "transfer_beyond_persistence", False),
               ("notes' ratio", "transfer_recon_ratio", False), ("decoder top-1 cos", "decoder_top1_cosine_mean", False)]
    table.add_column("site", no_wrap=True)
    for name, _, _ in columns:
        table.add_column(name, justify="right")
    for i, site in enumerate(matrix.sources):
        cells = []
        for _, metric, diagonal in columns:
            values = matrix.metrics.get(metric)
            if values is None:
                cells.append("-")
                continue
            row = values[i, i:i + 1] if diagonal else values[i][off[i]]
            cells.append(f"{np.nanmean(row):.3f}" if row.size and np.isfinite(row).any() else "-")
        table.add_row(_short_hook(site.hook_name), *cells)
    return table


def main() -> None:
    try:
        app()
    except LayerflowError as e:
        err.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted: finished shards and the last checkpoint are kept; rerun the same command to resume.")
        sys.exit(130)


if __name__ == "__main__":
    main()
