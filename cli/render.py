"""Everything the command line shows: the consoles, progress bars and tables. Commands hand it what
the library returned; nothing here computes a figure."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from layerflow.models.sites import KIND_DESCRIPTIONS, Site, SiteKind, unavailable_reason
from layerflow.formatting import fmt, iv

# Piped or logged output (not a terminal) gets wide tables rather than rich's 80-column default,
# which truncates the columns of a site table to a few characters.
out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
err = Console(stderr=True)


@contextlib.contextmanager
def progress(label: str, unit: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr; yields the `progress(done, total)` callback the library takes."""
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextlib.contextmanager
def stage_progress(stages: tuple[str, ...]) -> Iterator[Callable[[str, str, int, int | None], None]]:
    """The bar of `layerflow run`: the stage, its item (a model or a pair of models) and its units."""
    with Progress(TextColumn("[{task.fields[step]}/{task.fields[of]}] {task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("starting", total=None, step=0, of=len(stages))

        def show(stage: str, item: str, done: int, total: int | None) -> None:
            unit = {"capture": "tokens", "train": "steps", "transfer": "pairs"}.get(stage, "")
            bar.update(task, description=f"{stage} {item} {unit}".rstrip(), completed=done, total=total,
                       step=stages.index(stage) + 1)

        yield show


@contextlib.contextmanager
def hook_progress(label: str, unit: str) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar that also names the hook being worked on: `progress(hook, done, total)`."""
    with Progress(TextColumn(label + " [{task.fields[hook]}]"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                  console=err, transient=True) as bar:
        task = bar.add_task(label, total=None, hook="")
        yield lambda hook, done, total: bar.update(task, completed=done, total=total, hook=hook)


def note(text: str) -> None:
    err.print(f"[yellow]note:[/yellow] {escape(text)}")


def error(text: str) -> None:
    err.print(f"[bold red]error:[/bold red] {escape(text)}", highlight=False, soft_wrap=True)


def written(paths: list[Path] | tuple[Path, ...]) -> None:
    out.print(f"written: {', '.join(str(p) for p in paths)}")


def short_hook(hook: str) -> str:
    """blocks.3.hook_resid_post -> 3.resid_post: site labels that fit a table column."""
    return hook.removeprefix("blocks.").replace(".mlp.hook_in", ".mlp_in").replace(".hook_", ".")


# ------------------------------------------------------------------ models, sites, capture


def zoo_table(zoo: dict[str, Any], default: str) -> None:
    table = Table(title="layerflow model zoo")
    for col in ("name", "family", "layers", "d_model", "d_mlp", "tokenizer", "weights"):
        table.add_column(col, justify="right" if col in ("layers", "d_model", "d_mlp") else "left")
    for spec in zoo.values():
        name = f"{spec.name} (default)" if spec.name == default else spec.name
        table.add_row(name, spec.family, str(spec.n_layers), str(spec.d_model), str(spec.d_mlp),
                      spec.tokenizer, f"[{spec.source}] {spec.weights}")
    out.print(table)


def sites_table(model: str, cfg: Any) -> None:
    """Every site kind of a model: its hook, or why the architecture has none."""
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


def capture_summary(model: str, manifest: Any, out_dir: Path, seconds: float) -> None:
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
              f"{len(manifest.shards)} shards, {manifest.n_tokens / max(seconds, 1e-9):.0f} tokens/s this run "
              f"(mean norms exclude special-token positions)")


# ------------------------------------------------------------------ dictionaries


def presets_table(presets: dict[str, Any]) -> None:
    table = Table(title="schedule presets (layerflow train --preset NAME; override with --set KEY=VALUE)")
    for col in ("preset", "architecture", "hyperparameters at every depth", "by depth", "what it is"):
        table.add_column(col, overflow="fold")
    for name, schedule in presets.items():
        base = ", ".join(f"{k}={v}" for k, v in schedule.base.items())
        bands = "; ".join(f"<= {upper:.2f}: " + ", ".join(f"{k}={v}" for k, v in o.items())
                          for upper, o in schedule.by_depth) or "-"
        table.add_row(name, schedule.architecture, base, bands, schedule.description)
    out.print(table)


def site_table(title: str, rows: list[dict]) -> None:
    """Held-out figures per site (evals rows); columns no row has are left out."""
    table = Table(title=title)
    columns = [("site", "hook_name"), ("predicts", "hook_name_out"), ("FVU", "fvu"), ("prefix FVU", "prefix_fvu"),
               ("L0", "l0"), ("dead", "dead_fraction"), ("dense", "dense_fraction"), ("l2 ratio", "l2_ratio"),
               ("FVU out of domain", "ood_fvu"), ("CE score", "ce_loss_score"), ("dCE nats", "delta_ce"), ("KL", "kl_div")]
    present = [(name, key) for name, key in columns if any(r.get(key) is not None for r in rows)]
    for name, _ in present:
        table.add_column(name, justify="left" if name == "site" else "right")
    for r in rows:
        table.add_row(*[_cell(key, r.get(key)) if key != "ood_fvu" or r.get(key) is None else
                        escape(iv({"value": r["ood_fvu"], "low": r.get("ood_fvu_low"), "high": r.get("ood_fvu_high")}))
                        for _, key in present])
    out.print(table)
    if any(r.get("ood_fvu") is not None for r in rows):
        out.print("FVU out of domain: on the shipped 'ood' text (registers training did not emphasise); "
                  "in brackets, its 95% bootstrap interval over sequences.")


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.startswith("hook_name"):
        return short_hook(value)
    if isinstance(value, list):
        return ">".join(f"{v:.2f}" for v in value)
    return f"{value:.3g}"


def samples_tables(step: int, tops: dict[str, Any], contexts_of: Callable[[Any, int], list], features: int,
                   per_feature: int) -> None:
    for name, top in tops.items():
        table = Table(title=f"{short_hook(name)} at step {step}: top-activating held-out tokens")
        table.add_column("latent", justify="right")
        table.add_column("activation", justify="right")
        table.add_column(escape("context ([[firing token]])"), overflow="fold")
        for feature in top.top_features(features):
            for i, c in enumerate(contexts_of(top, feature)[:per_feature]):
                table.add_row(str(feature) if i == 0 else "", f"{c.activation:.3g}", escape(c.text().replace("\n", "\\n")))
        out.print(table)


# ------------------------------------------------------------------ transfer and runs


def transfer_table(matrix: Any, rows: list[Any]) -> None:
    """Per source site (`transfer.summary.source_rows`): its own EV and its means over the other sites."""
    n = len(matrix.sources)
    table = Table(title=f"{matrix.sources[0].model}: {n} x {n} sites, {matrix.settings['n_tokens']} held-out tokens each",
                  caption="means over the other sites with this site's dictionary as the source; relative transfer "
                          "clips each entry to [0, 1] first; in brackets, the bootstrap interval. The notes' loss ratio "
                          "is in the CSV only (docs/findings.md says why it misleads).")
    table.add_column("site", no_wrap=True)
    for name in ("own EV", "relative transfer", "beyond persistence", "decoder top-1 cos"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(short_hook(r.hook_name), iv(r.own_explained_variance), iv(r.relative_transfer),
                      iv(r.beyond_persistence), fmt(r.decoder_top1_cosine))
    out.print(table)


def references(refs: dict) -> None:
    """The floor and ceiling of each figure (`transfer.references`), as means over the sites measured."""
    if not refs:
        return
    labels = {"relative_transfer": "relative transfer", "decoder_matched_fraction": "decoder matches",
              "activation_matched_fraction": "activation matches", "decoder_top1_cosine_mean": "decoder top-1 cos"}
    for metric, label in labels.items():
        parts = []
        for kind in ("floor", "ceiling"):
            values = [v for v in refs.get(kind, {}).get(metric, {}).values() if v is not None]
            if values:
                parts.append(f"{kind} {np.mean(values):.3f} ({len(values)} site{'s' if len(values) > 1 else ''})")
        if parts:
            out.print(f"[bold]{label}[/bold]: " + ", ".join(parts))
    out.print("floor: each dictionary rotated inside its site's principal subspace (no shared features); "
              "ceiling: a second dictionary trained with another seed" if refs.get("ceiling", {}).get("relative_transfer")
              else "floor: each dictionary rotated inside its site's principal subspace (no shared features); "
                   "no ceiling (pass --twins)")


def transfer_summary(s: Any) -> None:
    """A few lines of `transfer.summary.TransferSummary`, each figure with its interval."""
    level = f"{s.level:.0%} intervals over {s.n_replicates} resamples" if s.n_replicates else "no resamples: no intervals"
    out.print(f"[bold]{s.metric}[/bold] ({level}): off-diagonal mean (clipped to [0, 1]) {iv(s.mean)}, median "
              f"{fmt(s.median)}; decay rate {iv(s.decay_rate)} per layer")
    out.print(f"  hubs (beyond the fitted decay): {s.hub_layers or 'none'}; breaks in the adjacent links: "
              f"{s.breaks or 'none'}; strong pairs (both directions' interval >= {s.strong_threshold}): "
              f"{len(s.bidirectional_pairs)} (+{s.strong_pairs_unresolved} not resolved)")


def cross_model_table(matrix: Any, same_depth: dict[int, int]) -> None:
    """Per source site: the same-depth target's figures, and the target it explains best (relative transfer)."""
    rel = matrix["relative_transfer"]

    def cell(metric: str, i: int, j: int) -> str:
        bounds = matrix.intervals.get(metric)
        value = matrix[metric][i, j]
        return fmt(value) if bounds is None else f"{fmt(value)} [{fmt(bounds[0][i, j])}, {fmt(bounds[1][i, j])}]"

    table = Table(title=f"{matrix.settings['model_a']} SAEs -> {matrix.settings['model_b']} sites "
                        f"({matrix.settings['n_heldout_words']} held-out words)",
                  caption="in brackets, the bootstrap interval over the held-out documents")
    for col in ("source", "depth", "same-depth target", "rel. transfer", "CKA", "best target", "rel. transfer "):
        label = col in ("source", "same-depth target", "best target")
        table.add_column(col, justify="left" if label else "right", no_wrap=label)
    for i, site in enumerate(matrix.sources):
        j, best = same_depth[i], int(np.nanargmax(rel[i])) if np.isfinite(rel[i]).any() else same_depth[i]
        table.add_row(short_hook(site.hook_name), f"{site.relative_depth:.2f}", short_hook(matrix.targets[j].hook_name),
                      cell("relative_transfer", i, j), cell("cka", i, j), short_hook(matrix.targets[best].hook_name),
                      cell("relative_transfer", i, best))
    out.print(table)


def run_table(title: str, record: dict[str, Any], out_dir: Path, report: Path) -> None:
    table = Table(title=title)
    for col in ("stage", "status", "wall time"):
        table.add_column(col, justify="right" if col == "wall time" else "left")
    for stage, info in record["stages"].items():
        status = info["status"] if info.get("last_invocation", "ran") == "ran" else info["last_invocation"]
        seconds = f"{info['seconds']:.0f} s" if "seconds" in info else "-"
        table.add_row(stage, status, seconds)
    out.print(table)
    if report.exists():
        out.print(f"report: {report}; plots in {out_dir / 'plots'}; figures in {out_dir / 'summary.json'}")


# ------------------------------------------------------------------ features


def _promoted(description: Any) -> str:
    return " ".join(repr(t) for t in description.promoted_tokens[:3]) if description else ""


def trace_tables(result: Any, top_k: int, chains: int) -> None:
    for m in result.models.values():
        for text in m.notes:
            note(text)
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


def intervention(r: Any) -> None:
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


def ranking(result: Any) -> None:
    for layer in result.layers:
        table = Table(title=f"{result.model} L{layer.layer}: {result.selection}, each ablated alone, "
                            f"ranked by mean held-out KL ({result.heldout_tokens} tokens)")
        for col in ("rank", "feature", "density", "KL mean", "KL when active", "dCE nats", "on prompt", "top held-out context"):
            table.add_column(col, justify="left" if col == "top held-out context" else "right", overflow="fold")
        for i, f in enumerate(layer.features):
            e = f.effect
            table.add_row(str(i + 1), str(f.feature), f"{f.density:.2%}", f"{e.kl_mean:.3g}", f"{e.kl_when_active:.3g}",
                          f"{e.delta_ce:+.4f}", "-" if f.prompt_activation is None else f"{f.prompt_activation:.2f}",
                          escape(f.description.snippet() if f.description else ""))
        out.print(table)

        def rho(value: float | None) -> str:
            return "n/a (fewer than 3 features, or constant)" if value is None else f"{value:+.2f}"

        out.print(f"L{layer.layer} selectivity vs importance, Spearman over {len(layer.features)} features: density vs "
                  f"mean KL {rho(layer.spearman_density_kl)}; density vs KL when active "
                  f"{rho(layer.spearman_density_kl_when_active)}")
