"""From run folders to matrices on disk: `transfer_run` (one model's dictionaries on its own sites)
and `cross_model_runs` (model A's dictionaries on model B's sites), each reading a training run's
dictionaries and its capture, computing the matrix and writing it with its matched features and
summaries, the matrix JSON last.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sae_lens import SAE

from layerflow import defaults
from layerflow.capture.store import ActivationStore, read_tensor
from layerflow.data.tokens import count_documents, iter_documents
from layerflow.dictionaries.io import load_saes
from layerflow.dictionaries.kinds import is_transcoder, output_hook
from layerflow.errors import LayerflowError
from layerflow.metrics import bootstrap_weights, percentile_interval
from layerflow.evaluate.splice import splice_start, spliced_sums
from layerflow.files import (DEPTH_FILE, MATCHED_FILE, SUMMARY_FILE, TOKENS_KEY, TRANSFER_DIR, cross_dir_name, json_safe,
                             run_store, write_json)
from layerflow.models.load import LoadedModel, load_model
from layerflow.models.sites import Site, parse_hook_name
from layerflow.transfer.align import capture_aligned
from layerflow.transfer.calibration import Calibration, SiteMatch
from layerflow.transfer.cross_model import compare_same_depth, cross_model_matrix
from layerflow.transfer.matrix import TransferMatrix
from layerflow.transfer.references import References, measure_references
from layerflow.transfer.summary import summarize_matrix
from layerflow.transfer.within import TransferOptions, transcoder_matrix, within_model_matrix

# The metrics summarised by default: the notes' ratio (for continuity) and the scale-aware ones.
SUMMARY_METRICS = ("relative_transfer", "explained_variance")  # EV-scale figures: bands and bounded averages apply


def sites_of_store(store: ActivationStore, hooks: list[str]) -> list[Site]:
    """The captured sites of `hooks`, in the store's site order (by layer, then site kind)."""
    order = {s.hook_name: i for i, s in enumerate(store.manifest.sites)}
    return sorted((s for s in store.manifest.sites if s.hook_name in hooks), key=lambda s: (s.layer, order[s.hook_name]))


def transfer_run(
    run: str | Path,
    store: str | Path | None = None,
    out_dir: str | Path | None = None,
    options: TransferOptions = TransferOptions(),
    hooks: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    loaded: LoadedModel | None = None,  # for options.spliced (else loaded from the store's manifest)
    twins: str | Path | None = None,
) -> tuple[TransferMatrix, list[Path]]:
    """The within-model matrix of every SAE under `run` (a training run, or any folder of SAELens
    SAE folders with `store`), on the store's held-out tokens; written to `out_dir`
    (default `<run>/transfer`). Returns the matrix and the files written (manifest last).

    A folder of transcoders (`is_transcoder`) gets `transcoder_matrix` instead: the store must hold
    each transcoder's input and output hooks. A folder mixing SAEs and transcoders is an error.

    With `options.references`, SAE matrices carry floors and ceilings (`references.py`): `twins`
    is a folder of SAEs of some of the same sites trained with another seed (a run's `ceiling/`)."""
    run = Path(run)
    saes = load_saes(run, hooks)
    transcoders = _folder_of_transcoders(saes, run)
    if transcoders and options.spliced:
        raise LayerflowError("--spliced is not available for transcoders yet: it splices SAEs at their own site.")
    activation_store = ActivationStore(store or run_store(run))
    needed = {h: [h, output_hook(sae, h)] if transcoders else [h] for h, sae in saes.items()}
    unknown = [f"{' -> '.join(hs)}" for hs in needed.values() if any(h not in activation_store.hook_names for h in hs)]
    if unknown:
        raise LayerflowError(f"{'Transcoders' if transcoders else 'SAEs'} for {', '.join(unknown)} have no activations "
                             f"in the capture at '{activation_store.root}' "
                             f"(captured: {', '.join(activation_store.hook_names)}).")
    sites = sites_of_store(activation_store, list(saes))
    hooks_needed = list(dict.fromkeys(h for s in sites for h in needed[s.hook_name]))
    activations = activation_store.heldout(hooks_needed, options.max_tokens, options.exclude_special_tokens)
    with_references = options.references and not transcoders
    twin_saes = _checked_twins(Path(twins), {s.hook_name: saes[s.hook_name] for s in sites}) \
        if twins is not None and with_references else {}  # checked before the long work
    calibration = store_calibration(activation_store, hooks_needed, options.calibration_tokens,
                                    options.exclude_special_tokens,
                                    covariance=bool(options.match_distance) or with_references)
    sequences = activation_store.heldout_sequences(options.max_tokens, options.exclude_special_tokens)
    compute = transcoder_matrix if transcoders else within_model_matrix
    matrix = compute(saes, activations, sites, calibration, options, progress, sequences)
    if with_references:
        matrix.references = _references(saes, activations, sites, calibration, twin_saes, sequences, options).to_dict()
    if options.spliced:
        loaded = loaded or load_model(activation_store.manifest.model["name"])
        _add_spliced(matrix, saes, activation_store, loaded, calibration, options)
    matrix.settings["store"] = str(activation_store.root.resolve())
    matrix.settings["saes"] = str(run.resolve())
    return matrix, write_transfer(matrix, Path(out_dir) if out_dir else run / TRANSFER_DIR)


def _folder_of_transcoders(saes: dict[str, SAE], folder: Path) -> bool:
    """True when every dictionary is a transcoder, False when none is; a mix is an error."""
    kinds = {h: is_transcoder(sae) for h, sae in saes.items()}
    if len(set(kinds.values())) > 1:
        tcs = [h for h, k in kinds.items() if k]
        plain = [h for h, k in kinds.items() if not k]
        raise LayerflowError(f"'{folder}' mixes transcoders ({', '.join(tcs)}) and SAEs ({', '.join(plain)}): a "
                             "transfer matrix compares one kind. Put them in separate folders, or pass --hooks.")
    return any(kinds.values())


def _references(saes: dict[str, SAE], activations: dict[str, torch.Tensor], sites: list[Site],
                calibration: Calibration, twin_saes: dict[str, SAE], sequences: torch.Tensor,
                options: TransferOptions) -> References:
    """Floors at every site, ceilings where `twin_saes` has a seed twin, matching floors at the twins'
    sites (or, without twins, at `options.reference_sites` sites spread over depth)."""
    reference_hooks = list(twin_saes) or spread_over_depth([s.hook_name for s in sites], options.reference_sites)
    return measure_references({s.hook_name: saes[s.hook_name] for s in sites}, activations,
                              {s.hook_name: s.layer for s in sites}, calibration, twin_saes, reference_hooks, sequences,
                              options.batch_tokens, options.null_quantile, options.seed, options.device)


def _checked_twins(folder: Path, saes: dict[str, SAE]) -> dict[str, SAE]:
    """The second-seed SAEs in `folder` for sites of `saes`: the same model's, reading the same width."""
    twins = {h: sae for h, sae in load_saes(folder).items() if h in saes}
    if not twins:
        raise LayerflowError(f"The seed twins in '{folder}' are for none of the sites compared ({', '.join(saes)}).")
    model = lambda sae: getattr(sae.cfg.metadata, "model_name", None)  # noqa: E731
    for hook, twin in twins.items():
        sae = saes[hook]
        if twin.cfg.d_in != sae.cfg.d_in or None not in (model(twin), model(sae)) and model(twin) != model(sae):
            raise LayerflowError(f"The seed twin of '{hook}' in '{folder}' reads width {twin.cfg.d_in} of model "
                                 f"'{model(twin)}', but the SAE there reads width {sae.cfg.d_in} of model "
                                 f"'{model(sae)}': twins must be SAEs of the same model and site.")
    return twins


def spread_over_depth(hooks: list[str], n: int) -> list[str]:
    """`n` of `hooks` (in depth order) spread over depth: the middles of n equal slices."""
    if n <= 0 or not hooks:
        return []
    return list(dict.fromkeys(hooks[min(len(hooks) - 1, int((k + 0.5) * len(hooks) / n))] for k in range(n)))


def store_calibration(store: ActivationStore, hooks: list[str], max_tokens: int | None,
                      exclude_special_tokens: bool = True, covariance: bool = False) -> Calibration:
    """Each hook's mean and spread (and their cross moments; with `covariance`, its covariance) on
    the first `max_tokens` train tokens of `store`, special positions left out: the statistics
    every cross-site match uses."""
    shards = store.shards("train")
    if not shards:
        raise LayerflowError(f"The capture at '{store.root}' has no train split: the sites' means and spreads are "
                             "fit on it (capture with --holdout < 1).")
    specials = torch.tensor(store.manifest.special_token_ids if exclude_special_tokens else [], dtype=torch.long)

    def chunks():
        left = max_tokens if max_tokens is not None else float("inf")
        for shard in shards:
            if left <= 0:
                return
            keep = ~torch.isin(read_tensor(shard, TOKENS_KEY).long().reshape(-1), specials)
            rows = keep.nonzero().squeeze(1)[:int(min(left, keep.sum()))]
            left -= len(rows)
            yield [read_tensor(shard, h)[rows].float() for h in hooks]

    return Calibration.accumulate(hooks, chunks(), covariance)


class _Matched:
    """SAE_i read at site j through the mean-and-spread match: encode(into source units), decode back."""

    def __init__(self, sae: SAE, match: SiteMatch):
        self.sae, self.match, self.device, self.dtype = sae, match, sae.device, sae.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(self.match.to(x.device).to_source(x.float()).to(x.dtype))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = self.sae.decode(latents)
        return self.match.to(out.device).to_target(out.float()).to(out.dtype)


def _add_spliced(matrix: TransferMatrix, saes: dict[str, SAE], store: ActivationStore, loaded: LoadedModel,
                 calibration: Calibration, options: TransferOptions) -> None:
    """spliced_delta_ce / spliced_kl: one spliced pass per source SAE, covering every target site."""
    if loaded.name != store.manifest.model["name"]:
        raise LayerflowError(f"The capture at '{store.root}' is of model '{store.manifest.model['name']}', "
                             f"but the loaded model is '{loaded.name}'.")
    tokens = store.tokens("heldout")
    specials = store.manifest.special_token_ids if options.exclude_special_tokens else []
    starts = {t.hook_name: splice_start(t.layer, t.kind) for t in matrix.targets}
    shape = (len(matrix.sources), len(matrix.targets))
    figures = {"delta_ce": "spliced_delta_ce", "kl_div": "spliced_kl"}
    values = {name: np.full(shape, np.nan) for name in figures.values()}
    resampled = bool(options.bootstrap) and len(tokens) >= defaults.MIN_BOOTSTRAP_GROUPS
    weights = bootstrap_weights(len(tokens), options.bootstrap, options.seed) if resampled else None
    replicates = {name: np.full((options.bootstrap, *shape), np.nan) for name in figures.values()} if resampled else {}
    for i, source in enumerate(matrix.sources):
        placed = {t.hook_name: _Matched(saes[source.hook_name], calibration.match(source.hook_name, t.hook_name))
                  for t in matrix.targets}
        sums = spliced_sums(placed, loaded.model, tokens, starts, specials)
        results = sums.metrics()
        for j, target in enumerate(matrix.targets):
            for key, name in figures.items():
                values[name][i, j] = results[target.hook_name][key]
            if resampled:
                for key, r in sums.resample(target.hook_name, weights).items():
                    replicates[figures[key]][:, i, j] = r.numpy()
    matrix.metrics.update(values)
    matrix.intervals.update({name: percentile_interval(r, options.interval) for name, r in replicates.items()})
    matrix.settings["spliced_intervals"] = (f"{options.interval:.0%} percentile bootstrap over the {len(tokens)} "
                                            f"held-out sequences spliced" if resampled else "none")


def write_transfer(matrix: TransferMatrix, folder: Path) -> list[Path]:
    """transfer_matrix.json/csv, matched_features.json (when matched), summary.json."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    matched = matrix.extras.get("matched_features")
    if matched:
        written.append(write_json(folder / MATCHED_FILE, [
            {"source": s, "target": t, **{kind: m.to_dict() for kind, m in result.items()}}
            for (s, t), result in matched.items()]))
    summaries = {}
    layers = [s.layer for s in matrix.sources]
    if len(set(layers)) == len(layers) and len(layers) >= 2:  # one site per layer: layer-indexed summaries
        for metric in SUMMARY_METRICS:
            if metric in matrix.metrics:
                summaries[metric] = summarize_matrix(matrix, metric).to_dict()
    if summaries:
        path = write_json(folder / SUMMARY_FILE, {"schema_version": 2, "summaries": summaries}, indent=1)
        written.append(path)
    written.extend(matrix.write(folder)[::-1])  # the matrix JSON is the manifest: written last
    return written


def cross_model_runs(
    run_a: str | Path,
    run_b: str | Path,
    out_dir: str | Path | None = None,
    source: str = defaults.SOURCE,
    max_words: int = defaults.CROSS_MODEL_WORDS,
    context_size: int = defaults.CONTEXT_SIZE,
    hooks_a: list[str] | None = None,
    hooks_b: list[str] | None = None,
    loaded: tuple[LoadedModel, LoadedModel] | None = None,
    twins_b: str | Path | None = None,
    **options: Any,
) -> tuple[TransferMatrix, list[Path]]:
    """Cross-model matrix between the SAEs of two runs (or SAELens folders with a layerflow store
    for each), on words of `source` read by both models; written to `out_dir` (default
    `<run_a>/transfer/<model a>~<model b>`), the matrix JSON last. `twins_b`: second-seed SAEs of
    some of B's sites (a run's `ceiling/<model b>`), for floors and ceilings there."""
    run_a, run_b = Path(run_a), Path(run_b)
    sides = []
    for run, hooks in ((run_a, hooks_a), (run_b, hooks_b)):
        saes = load_saes(run, hooks)
        model = ActivationStore(run_store(run)).manifest.model["name"]
        sides.append((dict(sorted(saes.items(), key=lambda kv: parse_hook_name(kv[0])[0])), model))
    (saes_a, model_a), (saes_b, model_b) = sides
    twins = _checked_twins(Path(twins_b), saes_b) if twins_b is not None else None  # before the long work
    loaded_a, loaded_b = loaded or (load_model(model_a), load_model(model_b))
    # Spread the words over every document of a file source (a stream: over CROSS_MODEL_DOCUMENTS of them).
    n_documents = count_documents(source) or defaults.CROSS_MODEL_DOCUMENTS
    aligned = capture_aligned(loaded_a, list(saes_a), loaded_b, list(saes_b), iter_documents(source),
                              context_size=context_size, max_words=max_words,
                              max_words_per_document=max(10, math.ceil(max_words / n_documents)))
    matrix = cross_model_matrix(saes_a, saes_b, aligned, twins_b=twins, **options)
    matrix.settings["source"] = source
    folder = Path(out_dir) if out_dir else run_a / TRANSFER_DIR / cross_dir_name(model_a, model_b)
    folder.mkdir(parents=True, exist_ok=True)
    matched = write_json(folder / MATCHED_FILE, [{"source": s, "target": t, **m.to_dict()}
                                                 for (s, t), m in matrix.extras["matched_features"].items()])
    comparisons = {m: json_safe(asdict(compare_same_depth(matrix, m)))
                   for m in ("relative_transfer", "stitched_explained_variance", "cka")}
    depth = write_json(folder / DEPTH_FILE, comparisons, indent=1)
    return matrix, [matched, depth, *matrix.write(folder)[::-1]]
