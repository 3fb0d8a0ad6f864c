"""The reasoning tracker: which SAE features fire at each layer for a prompt, what they mean, and
how they chain from layer to layer.

`trace(run, prompt)` captures every SAE site of a run's model in one forward pass, encodes each
with its SAE (or transcoder, at its input site), and reports per layer the top-k features at the
chosen token (default the last; "all": every non-special token).

Trajectories chain features through consecutive SAE sites with the run's matched features
(`transfer/<model>/matched_features.json`, decoder and activation Hungarian matchings of
adjacent sites). Feature f at site i links to g at site i+1 when g is f's significant partner
(beats the null) under either matching and g is active at this token; when both matchings
give an active partner, the one firing more is taken. Every top-k feature is followed back to
the earliest site it can be traced to and then forward to where the chain ends: at the last
site, where no significant partner exists, where the partner is silent at this token, or where
it joins a chain already listed (chains are disjoint, so a shared tail is listed once).

Features come with descriptions (`describe.py`: top held-out contexts, cached in the run
folder, and logit-lens promoted tokens).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from layerflow import defaults
from layerflow.errors import LayerflowError
from layerflow.features.describe import FeatureDescription
from layerflow.features.run_saes import Loader, RunSAEs, model_names, open_run
from layerflow.files import MATCHED_FILE, TRANSFER_DIR, write_json
from layerflow.results import RunResults
from layerflow.transfer.matching import FeatureMatching


@dataclass
class FeatureHit:
    feature: int
    activation: float
    rank: int  # among the features active at this site and token; 0 = strongest


@dataclass
class LayerFeatures:
    hook: str
    layer: int
    top: list[FeatureHit]  # strongest first, active ones only (at most top_k)
    n_active: int  # features active at this token (the SAE's L0 here)


@dataclass
class TrajectoryStep:
    hook: str
    layer: int
    feature: int
    activation: float
    rank: int
    link: dict[str, float] = field(default_factory=dict)  # matching kind -> similarity of the link from the previous step


@dataclass
class Trajectory:
    steps: list[TrajectoryStep]
    end: str  # why the chain stops
    joins: tuple[str, int] | None = None  # (hook, feature) of the listed chain this one runs into

    @property
    def persists(self) -> bool:
        return len(self.steps) > 1

    def label(self) -> str:
        return " -> ".join(f"L{s.layer}:{s.feature}" for s in self.steps)


@dataclass
class TokenTrace:
    position: int
    token: str
    layers: list[LayerFeatures]
    trajectories: list[Trajectory]  # longest first


@dataclass
class ModelTrace:
    model: str
    tokens: list[str]  # the prompt as the model reads it
    positions: list[TokenTrace]
    descriptions: dict[str, dict[int, FeatureDescription]]  # hook -> feature -> description
    notes: list[str] = field(default_factory=list)

    def description(self, hook: str, feature: int) -> FeatureDescription | None:
        return self.descriptions.get(hook, {}).get(feature)


@dataclass
class Trace:
    prompt: str
    top_k: int
    models: dict[str, ModelTrace]

    def to_dict(self) -> dict[str, Any]:
        def model(m: ModelTrace) -> dict[str, Any]:
            d = asdict(m)
            d["descriptions"] = {h: {str(f): asdict(desc) for f, desc in fs.items()} for h, fs in m.descriptions.items()}
            for p, token in zip(d["positions"], m.positions):
                for t, trajectory in zip(p["trajectories"], token.trajectories):
                    t["persists"] = trajectory.persists
            return d

        return {"schema": "layerflow.trace", "schema_version": 1, "prompt": self.prompt, "top_k": self.top_k,
                "models": {name: model(m) for name, m in self.models.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def write(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict(), indent=1)


def trace(
    run: str | Path | RunResults,
    prompt: str | list[int] | torch.Tensor,
    token: int | str = -1,
    top_k: int = defaults.TRACE_TOP_K,
    models: list[str] | None = None,
    load: Loader | None = None,
) -> Trace:
    """Trace `prompt` through every SAE site of each model of the run (or of `models`), side by side.

    `prompt`: text, or token ids used as given (models without a tokenizer). `token`: a position
    (negative counts from the end) or "all". `load`: zoo name -> LoadedModel (default `load_model`).
    """
    results = open_run(run)
    if top_k < 1:
        raise LayerflowError(f"top_k {top_k} must be at least 1.")
    if token != "all" and not isinstance(token, int):
        raise LayerflowError(f"Token '{token}' is not a position: give an integer (e.g. -1 for the last) or 'all'.")
    if isinstance(prompt, str) and not prompt.strip():
        raise LayerflowError("The prompt is empty: give some text, e.g. --prompt 'The capital of France is'.")
    opened = [RunSAEs.open(results, name) for name in model_names(results, models)]
    traced = {}
    for run_saes in opened:
        traced[run_saes.name] = _trace_model(run_saes.load(load), prompt, token, top_k)
        run_saes.loaded = None  # one model in memory at a time
    text = prompt if isinstance(prompt, str) else " ".join(str(t) for t in torch.as_tensor(prompt).reshape(-1).tolist())
    return Trace(text, top_k, traced)


@torch.no_grad()
def _trace_model(run_saes: RunSAEs, prompt: Any, token: int | str, top_k: int) -> ModelTrace:
    model = run_saes.tl_model
    tokens = run_saes.tokenize(prompt)
    texts = run_saes.token_texts(tokens)
    positions = run_saes.token_positions(tokens, token, texts)
    hooks = run_saes.hooks
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in set(hooks))
    latents = {h: run_saes.encode(h, cache[h][0, positions]) for h in hooks}  # [n_positions, d_sae]
    matchings, notes = load_links(run_saes.results, run_saes.name, hooks)
    traces = []
    for i, position in enumerate(positions):
        acts = {h: latents[h][i] for h in hooks}
        layers = [_layer_features(h, run_saes.layer(h), acts[h], top_k) for h in hooks]
        trajectories = chain_features(hooks, [run_saes.layer(h) for h in hooks], acts, layers, matchings)
        traces.append(TokenTrace(position, texts[position], layers, trajectories))
    wanted: dict[str, set[int]] = {h: set() for h in hooks}
    for t in traces:
        for layer in t.layers:
            wanted[layer.hook].update(hit.feature for hit in layer.top)
        for trajectory in t.trajectories:
            for step in trajectory.steps:
                wanted[step.hook].add(step.feature)
    stats = run_saes.feature_stats()
    descriptions = {h: run_saes.describe(h, sorted(fs), stats[h]) for h, fs in wanted.items() if fs}
    return ModelTrace(run_saes.name, texts, traces, descriptions, notes)


def _layer_features(hook: str, layer: int, acts: torch.Tensor, top_k: int) -> LayerFeatures:
    n_active = int((acts > 0).sum())
    values, features = acts.topk(min(top_k, n_active)) if n_active else (acts[:0], acts[:0].long())
    hits = [FeatureHit(int(f), float(v), r) for r, (v, f) in enumerate(zip(values.tolist(), features.tolist()))]
    return LayerFeatures(hook, layer, hits, n_active)


# ------------------------------------------------------------------ trajectories

Links = dict[tuple[str, str], dict[str, FeatureMatching]]  # (site i, site i+1) -> kind -> matching


def load_links(results: RunResults, model: str, hooks: list[str]) -> tuple[Links, list[str]]:
    """The matchings of consecutive SAE sites from the run's transfer stage, oriented i -> i+1."""
    path = results.root / TRANSFER_DIR / model / MATCHED_FILE
    if not path.exists():
        return {}, [f"no {MATCHED_FILE} in the run (transfer stage not run, or match_distance 0): no trajectories"]
    found: Links = {}
    for entry in json.loads(path.read_text()):
        kinds = {k: FeatureMatching.from_dict(entry[k]) for k in ("decoder", "activation") if k in entry}
        found[entry["source"], entry["target"]] = kinds
        found[entry["target"], entry["source"]] = {k: _reverse(m) for k, m in kinds.items()}
    links = {(a, b): found[a, b] for a, b in zip(hooks, hooks[1:]) if (a, b) in found}
    missing = [f"{a} -> {b}" for a, b in zip(hooks, hooks[1:]) if (a, b) not in found]
    notes = [f"no matching for {', '.join(missing)}: chains break there"] if missing else []
    return links, notes


def _reverse(m: FeatureMatching) -> FeatureMatching:
    order = m.target_index.argsort()
    return FeatureMatching(m.kind, m.target_index[order], m.source_index[order], m.similarity[order],
                           m.null_threshold, m.significant[order])


def _partners(matchings: dict[str, FeatureMatching], feature: int) -> dict[int, dict[str, float]]:
    """{partner feature: {kind: similarity}} over the significant matches of `feature`."""
    out: dict[int, dict[str, float]] = {}
    for kind, m in matchings.items():
        i = int(m.source_index.searchsorted(feature))
        if i < len(m.source_index) and m.source_index[i] == feature and m.significant[i]:
            out.setdefault(int(m.target_index[i]), {})[kind] = float(m.similarity[i])
    return out


def _best_active(partners: dict[int, dict[str, float]], acts: torch.Tensor) -> tuple[int, dict[str, float]] | None:
    active = [(float(acts[g]), g) for g in partners if acts[g] > 0]
    if not active:
        return None
    g = max(active)[1]
    return g, partners[g]


def chain_features(hooks: list[str], layers: list[int], acts: dict[str, torch.Tensor], top: list[LayerFeatures],
                   links: Links) -> list[Trajectory]:
    """Every top feature's chain, from the earliest site it can be traced back to; longest first."""
    ranks = {}
    for h in hooks:
        order = acts[h].argsort(descending=True)
        n_active = int((acts[h] > 0).sum())
        ranks[h] = {int(f): r for r, f in enumerate(order[:n_active].tolist())}
    starts: list[tuple[int, int]] = []
    for i, layer in enumerate(top):
        for hit in layer.top:
            s, f = i, hit.feature
            while s > 0 and (hooks[s], hooks[s - 1]) in links:
                back = _best_active(_partners(links[hooks[s], hooks[s - 1]], f), acts[hooks[s - 1]])
                if back is None:
                    break
                s, f = s - 1, back[0]
            if (s, f) not in starts:
                starts.append((s, f))
    # Chains are disjoint: one that reaches a feature already on an earlier chain stops there
    # ("joins"), so shared tails are listed once. Earlier-starting, stronger chains claim first.
    starts.sort(key=lambda sf: (sf[0], -float(acts[hooks[sf[0]]][sf[1]])))
    claimed: dict[tuple[int, int], int] = {}
    trajectories = []
    for s, f in starts:
        if (s, f) in claimed:
            continue
        steps = [TrajectoryStep(hooks[s], layers[s], f, float(acts[hooks[s]][f]), ranks[hooks[s]][f])]
        claimed[s, f] = len(trajectories)
        joins = None
        while True:
            if s + 1 == len(hooks):
                end = "last SAE site"
                break
            pair = (hooks[s], hooks[s + 1])
            if pair not in links:
                end = f"no matching between L{layers[s]} and L{layers[s + 1]}"
                break
            partners = _partners(links[pair], f)
            if not partners:
                end = f"no significant match at L{layers[s + 1]}"
                break
            nxt = _best_active(partners, acts[hooks[s + 1]])
            if nxt is None:
                end = f"matched feature {', '.join(map(str, partners))} at L{layers[s + 1]} is silent here"
                break
            if (s + 1, nxt[0]) in claimed:
                end = f"joins the chain through L{layers[s + 1]}:{nxt[0]}"
                joins = (hooks[s + 1], nxt[0])
                break
            s, (f, link) = s + 1, nxt
            steps.append(TrajectoryStep(hooks[s], layers[s], f, float(acts[hooks[s]][f]), ranks[hooks[s]][f], link))
            claimed[s, f] = len(trajectories)
        trajectories.append(Trajectory(steps, end, joins))
    return sorted(trajectories, key=lambda t: (-len(t.steps), -sum(s.activation for s in t.steps)))
