"""Capture: stored activations equal run_with_cache, resume after interruption, bad inputs."""

import gzip
import json

import pytest
import torch
import xxhash

from conftest import run_cli, tiny_twin
from layerflow.capture import ActivationStore, CaptureConfig, capture
from layerflow.errors import LayerflowError
from layerflow.files import CAPTURE_MANIFEST as MANIFEST_FILE
from layerflow.files import PLAN_FILE
from layerflow.models.sites import SiteKind

KINDS = [SiteKind.resid_pre, SiteKind.mlp_in, SiteKind.mlp_hidden, SiteKind.resid_post]


def _reference(model, tokens, hook_names):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook_names)
    return {h: cache[h].reshape(-1, cache[h].shape[-1]) for h in hook_names}


def _tiny_config(**kw):
    base = dict(model="gemma-2-2b-twin", layers=[0, 1], kinds=KINDS, n_tokens=40 * 16, context_size=16,
                source="random", batch_size=3, shard_seqs=7, holdout_fraction=0.25)
    return CaptureConfig(**{**base, **kw})


def test_round_trip_equals_run_with_cache(tmp_path):
    loaded = tiny_twin("gemma-2-2b-twin")
    manifest = capture(_tiny_config(), tmp_path, loaded=loaded)
    store = ActivationStore(tmp_path)
    assert manifest.split == {"train_seqs": 30, "heldout_seqs": 10, "train_tokens": 480, "heldout_tokens": 160}
    assert len(manifest.shards) == 5 + 2  # 30 train seqs in shards of 7, 10 held-out
    for split in ("train", "heldout"):
        tokens = store.tokens(split)
        ref = _reference(loaded.model, tokens, store.hook_names)
        for hook in store.hook_names:
            torch.testing.assert_close(store.activations(hook, split), ref[hook], atol=1e-5, rtol=1e-5)
    # checksums and statistics in the manifest are those of the files and activations
    for shard in manifest.shards:
        data = (tmp_path / "shards" / shard.file).read_bytes()
        assert shard.checksum == "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()
    hook = "blocks.1.hook_resid_post"
    acts = torch.cat([store.activations(hook, s) for s in ("train", "heldout")])
    bos = torch.cat([store.special_mask(s) for s in ("train", "heldout")])
    assert bos.sum() >= 40  # one BOS per sequence (random ids may also hit the BOS id)
    expected = acts[~bos].norm(dim=-1).mean().item()
    assert manifest.mean_norm[hook] == pytest.approx(expected, rel=1e-5)


def test_heldout_sample_is_whole_sequences_from_across_the_split(tmp_path):
    capture(_tiny_config(), tmp_path, loaded=tiny_twin("gemma-2-2b-twin"))
    store = ActivationStore(tmp_path)
    hook = "blocks.1.hook_resid_post"
    tokens = store.tokens("heldout")  # 10 sequences of 16, BOS first
    sample = store.heldout([hook], max_tokens=40)[hook]
    sequences = store.heldout_sequences(max_tokens=40)
    assert len(sample) == len(sequences) == 40
    # independently: every kept position of the sequences named, in order, cut at 40
    keep = ~store.special_mask("heldout").reshape(tokens.shape)
    chosen = sequences.unique()
    expected = torch.cat([store.activations(hook, "heldout").reshape(*tokens.shape, -1)[q][keep[q]] for q in chosen])[:40]
    torch.testing.assert_close(sample, expected)
    assert chosen[0] == 0 and chosen[-1] == len(tokens) - 1  # spread to the split's last sequence, not its first block
    assert (chosen.diff() >= 2).all()
    everything = store.heldout([hook])[hook]
    assert len(everything) == int(keep.sum()) and len(store.heldout_sequences()) == len(everything)


def test_real_model_round_trip_with_default_corpus(tmp_path, smollm2):
    cfg = CaptureConfig("smollm2-135m", [0, 13, 29], [SiteKind.resid_post, SiteKind.mlp_out],
                        n_tokens=6 * 64, context_size=64, batch_size=4, holdout_fraction=0.34)
    manifest = capture(cfg, tmp_path, loaded=smollm2)
    store = ActivationStore(tmp_path)
    tokens = store.tokens("train")
    assert (tokens[:, 0] == smollm2.tokenizer.bos_token_id).all()  # explicit BOS
    assert manifest.bos_token_id == smollm2.tokenizer.bos_token_id
    ref = _reference(smollm2.model, tokens, store.hook_names)
    for hook in store.hook_names:
        torch.testing.assert_close(store.activations(hook), ref[hook], atol=1e-4, rtol=1e-4)
    # the BOS position is excluded from the norm statistics (its norm is an outlier)
    acts = torch.cat([store.activations("blocks.29.hook_resid_post", s) for s in ("train", "heldout")])
    mask = torch.cat([store.special_mask(s) for s in ("train", "heldout")])
    assert manifest.mean_norm["blocks.29.hook_resid_post"] == pytest.approx(acts[~mask].norm(dim=-1).mean().item(), rel=1e-5)
    assert manifest.model["weights_source"].startswith("gguf:")
    assert "public domain" in manifest.text_source["description"]


def test_capture_stops_after_the_deepest_layer(tmp_path):
    loaded = tiny_twin("gpt2-twin")
    fired = []
    loaded.model.hook_dict["blocks.1.hook_resid_pre"].add_hook(lambda a, hook: fired.append(hook.name))
    try:
        capture(_tiny_config(model="gpt2-twin", layers=[0], kinds=[SiteKind.resid_post]), tmp_path, loaded=loaded)
    finally:
        loaded.model.reset_hooks(including_permanent=True)
    assert fired == []  # block 1 never ran, so neither did the unembedding


class Interrupt(Exception):
    pass


def test_resume_after_interruption(tmp_path):
    loaded = tiny_twin("pythia-70m-twin")
    cfg = _tiny_config(model="pythia-70m-twin", kinds=[SiteKind.resid_post, SiteKind.mlp_out])

    def interrupt_midway(done, total):
        if done >= 15 * 16:  # after two full shards have been handed to the writer
            raise Interrupt

    with pytest.raises(Interrupt):
        capture(cfg, tmp_path / "run", loaded=loaded, progress=interrupt_midway)
    shards = tmp_path / "run" / "shards"
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.safetensors")}
    assert not (tmp_path / "run" / MANIFEST_FILE).exists()  # manifest is written last
    assert len(kept) >= 2 and not list(shards.glob("*.tmp"))

    manifest = capture(cfg, tmp_path / "run", loaded=loaded)
    for name, mtime in kept.items():  # finished shards were kept, not recomputed
        assert (shards / name).stat().st_mtime_ns == mtime
    fresh = capture(cfg, tmp_path / "fresh", loaded=loaded)
    assert [s.checksum for s in manifest.shards] == [s.checksum for s in fresh.shards]
    # a complete capture is returned as is
    assert capture(cfg, tmp_path / "run", loaded=loaded).shards == manifest.shards


def test_refuses_a_different_run_unless_overwrite(tmp_path):
    loaded = tiny_twin("gpt2-twin")
    capture(_tiny_config(model="gpt2-twin"), tmp_path, loaded=loaded)
    before = (tmp_path / MANIFEST_FILE).read_text()
    with pytest.raises(LayerflowError, match=r"holds a different capture.*n_tokens: 640 -> 320.*--overwrite"):
        capture(_tiny_config(model="gpt2-twin", n_tokens=320), tmp_path, loaded=loaded)
    assert (tmp_path / MANIFEST_FILE).read_text() == before
    manifest = capture(_tiny_config(model="gpt2-twin", n_tokens=320), tmp_path, loaded=loaded, overwrite=True)
    assert manifest.n_tokens == 320


def test_refuses_a_foreign_directory_even_with_overwrite(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(LayerflowError, match="holds no layerflow capture"):
        capture(_tiny_config(model="gpt2-twin"), tmp_path, loaded=tiny_twin("gpt2-twin"), overwrite=True)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_nan_activations_are_caught_and_nothing_is_saved(tmp_path):
    loaded = tiny_twin("gpt2-twin")
    loaded.model.hook_dict["blocks.0.hook_resid_post"].add_hook(lambda a, hook: a.fill_(float("nan")))
    try:
        with pytest.raises(LayerflowError, match=r"blocks\.0\.hook_resid_post.*NaN"):
            capture(_tiny_config(model="gpt2-twin", kinds=[SiteKind.resid_post]), tmp_path, loaded=loaded)
    finally:
        loaded.model.reset_hooks(including_permanent=True)
    assert not list((tmp_path / "shards").glob("*.safetensors")) and not (tmp_path / MANIFEST_FILE).exists()


def test_float16_overflow_is_refused_with_a_way_out(tmp_path):
    """Deep residuals (Gemma-3's reach ~1e5) do not fit float16: refuse rather than store inf."""
    loaded = tiny_twin("gpt2-twin")
    loaded.model.hook_dict["blocks.1.hook_resid_post"].add_hook(lambda a, hook: a.mul_(1e6))
    try:
        with pytest.raises(LayerflowError, match=r"blocks\.1\.hook_resid_post reach .*float16.*bfloat16"):
            capture(_tiny_config(model="gpt2-twin", kinds=[SiteKind.resid_post], dtype="float16"), tmp_path,
                    loaded=loaded)
        assert not list((tmp_path / "shards").glob("*.safetensors"))
        capture(_tiny_config(model="gpt2-twin", kinds=[SiteKind.resid_post], dtype="bfloat16"), tmp_path / "bf16",
                loaded=loaded)
        assert ActivationStore(tmp_path / "bf16").activations("blocks.1.hook_resid_post").isfinite().all()
    finally:
        loaded.model.reset_hooks(including_permanent=True)


@pytest.mark.parametrize("text,match", [
    ("", r"is empty"),
    ("Only a few words here.", r"too short: it yields \d+ tokens"),
])
def test_empty_or_short_corpus(tmp_path, smollm2, text, match):
    corpus = tmp_path / "corpus.txt.gz"
    with gzip.open(corpus, "wt") as f:
        f.write(text)
    cfg = CaptureConfig("smollm2-135m", [0], source=str(corpus), n_tokens=256, context_size=64)
    with pytest.raises(LayerflowError, match=match):
        capture(cfg, tmp_path / "out", loaded=smollm2)
    assert not (tmp_path / "out").exists()


def test_twin_cannot_read_text(tmp_path):
    with pytest.raises(LayerflowError, match="no tokenizer.*--source random"):
        capture(_tiny_config(model="gpt2-twin", source="default"), tmp_path / "out", loaded=tiny_twin("gpt2-twin"))
    assert not (tmp_path / "out").exists()


# --- the CLI, as a user runs it: non-zero exit, message naming the value, no traceback, nothing written


@pytest.mark.parametrize("args,message", [
    (["capture", "gpt3"], "Unknown model 'gpt3'"),
    (["capture", "pythia-70m-twin", "--layers", "6"], "Layer 6 is out of range: pythia-70m-twin has 6 layers"),
    (["capture", "pythia-70m-twin", "--sites", "resid_mid", "--source", "random"], "no resid_mid"),
    (["capture", "gpt2-twin", "--sites", "resid_mdi"], "Unknown site kind 'resid_mdi'"),
    (["sites", "phi3"], "Unknown model 'phi3'"),
    (["capture", "smollm2-135m", "--source", "/no/such/corpus.txt"], "Text source '/no/such/corpus.txt' is not a file"),
])
def test_cli_bad_input(tmp_path, args, message):
    result = run_cli(*args, "--out", str(tmp_path / "out")) if args[0] == "capture" else run_cli(*args)
    assert result.returncode == 2
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_hub_unreachable_suggests_offline_models(tmp_path):
    result = run_cli("capture", "gpt2", "--out", str(tmp_path / "out"), env_extra={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    stderr = " ".join(result.stderr.split())
    assert "smollm2-135m" in stderr and "gpt2-twin" in stderr
    assert not (tmp_path / "out").exists()


def test_cli_capture_twin(tmp_path):
    out = tmp_path / "cap"
    result = run_cli("capture", "pythia-70m-twin", "--layers", "0:6:2", "--sites", "resid_pre,mlp_in",
                     "--source", "random", "--tokens", "512", "--context-size", "32", "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert [s["hook_name"] for s in manifest["sites"]] == [
        f"blocks.{L}.{h}" for L in (0, 2, 4) for h in ("hook_resid_pre", "mlp.hook_in")]
    assert json.loads((out / PLAN_FILE).read_text())["n_tokens"] == 512
    assert "blocks.4.mlp.hook_in" in result.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shard_writer_is_read_by_safetensors(tmp_path, dtype):
    from safetensors.torch import load_file

    from layerflow.capture import write_safetensors

    tensors = {"blocks.0.hook_resid_post": torch.randn(5, 7).to(dtype), "tokens": torch.arange(6, dtype=torch.int32).view(2, 3)}
    checksum = write_safetensors(tmp_path / "x.safetensors", tensors)
    assert checksum == "xxh3_128:" + xxhash.xxh3_128((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)


def test_datasets_source_streams_a_local_dataset(tmp_path, smollm2):
    from layerflow.data.tokens import TokenPlan, make_sequences

    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"text": f"Document number {i} talks about topic {i % 7} at some length. " * 5} for i in range(40)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tok = smollm2.tokenizer
    seqs = make_sequences(8, TokenPlan(f"hf:{folder}", 32, True, tok.bos_token_id, 0), tok)
    assert seqs.shape == (8, 32) and (seqs[:, 0] == tok.bos_token_id).all()
    # Independently: rows tokenized and joined by EOS, cut into 31-token bodies.
    stream = []
    for i, row in enumerate(rows):
        stream += ([tok.eos_token_id] if i else []) + tok.encode(row["text"], add_special_tokens=False)
    bodies = {tuple(stream[k : k + 31]) for k in range(0, len(stream) - 30, 31)}
    assert all(tuple(seq[1:].tolist()) in bodies for seq in seqs)


def test_unreachable_dataset_is_a_clear_error(tmp_path, smollm2):
    from layerflow.data.tokens import TokenPlan, make_sequences

    with pytest.raises(LayerflowError, match=r"(?s)Could not stream Hugging Face dataset '.*no-such-dataset'.*Offline sources"):
        make_sequences(4, TokenPlan(f"hf:{tmp_path}/no-such-dataset", 32, True, 1, 0), smollm2.tokenizer)


def test_cli_refuses_a_different_run_and_a_short_corpus(tmp_path):
    out = tmp_path / "cap"
    common = ["--layers", "0", "--source", "random", "--context-size", "16", "--out", str(out)]
    assert run_cli("capture", "gpt2-twin", "--tokens", "64", *common).returncode == 0
    manifest = (out / MANIFEST_FILE).read_text()
    refused = run_cli("capture", "gpt2-twin", "--tokens", "128", *common)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "holds a different capture" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / MANIFEST_FILE).read_text() == manifest

    short = tmp_path / "short.txt"
    short.write_text("Too short to fill even one sequence of sixty-four tokens.")
    result = run_cli("capture", "smollm2-135m", "--layers", "0", "--source", str(short), "--tokens", "512",
                     "--context-size", "64", "--out", str(tmp_path / "short-out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "too short" in " ".join(result.stderr.split()) and str(short) in " ".join(result.stderr.split())
    assert not (tmp_path / "short-out").exists()
