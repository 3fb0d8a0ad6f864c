"""Cross-model transfer: word alignment, affine stitching, planted transfer, and the real-model plumbing."""

import json
import functools
import random
import re

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

from conftest import HAS_GEMMA3, needs_gemma3, tiny_twin
from layerflow.data.tokens import iter_documents
from layerflow.errors import LayerflowError
from layerflow.metrics import bootstrap_weights
from layerflow.cache import cache_dir
from layerflow.models.load import load_model
from layerflow.models.sites import site_at as SiteId
from layerflow.testing import planted_layers, true_sae
from layerflow.transfer import TransferMatrix
from layerflow.transfer.align import (AlignedActivations, align_words, capture_aligned, split_document, tokenize_text,
                                      word_ends)
from layerflow.transfer.cross_model import (benjamini_hochberg, compare_same_depth, cross_model_matrix, fit_affine,
                                            document_permutations, fit_stitch, linear_cka, match_features,
                                            paired_svcca, same_depth_pairs, centered_gram)

R0, R1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def tokenizer(name: str):
    """The model's tokenizer from its dequantized cache folder (seconds), else from the loaded model."""
    from transformers import AutoTokenizer

    if name == "gemma3-270m" and not HAS_GEMMA3:
        pytest.skip("opt-in Gemma-3-270m packages not installed")
    folders = sorted(p.parent for p in (cache_dir() / "models").glob(f"{name}-*/layerflow_source.json"))
    return AutoTokenizer.from_pretrained(folders[-1]) if folders else load_model(name).tokenizer


# --- word alignment ------------------------------------------------------------------------------


class SplitTokenizer:
    """A fake fast tokenizer: tokens are given as (start, end) spans; BOS id 7."""

    bos_token_id, name_or_path = 7, "fake"

    def __init__(self, spans_for):
        self.spans_for = spans_for

    def __call__(self, text, add_special_tokens, return_offsets_mapping):
        spans = self.spans_for(text)
        return {"input_ids": list(range(100, 100 + len(spans))), "offset_mapping": spans}


def _spans(text, pattern):
    return [m.span() for m in re.finditer(pattern, text)]


def test_align_words_uses_end_offsets_and_bos():
    text = "the cat's mat."
    gpt_style = SplitTokenizer(lambda t: _spans(t, r"\s?[a-z]+|\s?'[a-z]+|[.]"))  # " cat" span includes the space
    sentencepiece_style = SplitTokenizer(lambda t: _spans(t, r"\s?[a-z']+\.?"))  # "▁mat." one token
    pos_a, pos_b = align_words(gpt_style, sentencepiece_style, text)
    # Words end at 3, 9, 14; A's tokens: the|cat|'s|mat|. B's: the|cat's|mat.
    assert pos_a.tolist() == [1, 3, 5] and pos_b.tolist() == [1, 2, 3]
    no_bos = align_words(gpt_style, sentencepiece_style, text, prepend_bos=(False, True))
    assert no_bos[0].tolist() == (pos_a - 1).tolist() and no_bos[1].tolist() == pos_b.tolist()
    assert tokenize_text(gpt_style, text).ids[0] == 7 and tokenize_text(gpt_style, text).ends[0] == -1


def test_words_ending_inside_a_token_are_dropped():
    text = "ab cd ef"
    a = SplitTokenizer(lambda t: [(0, 2), (2, 5), (5, 8)])
    b = SplitTokenizer(lambda t: [(0, 4), (4, 5), (5, 8)])  # "ab c" is one token: "ab" ends inside it
    pos_a, pos_b = align_words(a, b, text)
    assert len(word_ends(text)) - len(pos_a) == 1 and pos_a.tolist() == [2, 3] and pos_b.tolist() == [2, 3]


@needs_gemma3
def test_real_tokenizers_align_at_the_same_character():
    tok_a, tok_b = tokenizer("smollm2-135m"), tokenizer("gemma3-270m")
    text = ('Hello, world! It\'s 3.14 -- "quoted" (paren) don\'t e.g. naïve café 😀 end.\n\n'
            "  Two  spaces\tand a tab; x> </y <b>bold</b> 1,000,000 U.S.A. well-known")
    ids_a, ids_b = tokenize_text(tok_a, text).ids, tokenize_text(tok_b, text).ids
    pos_a, pos_b = align_words(tok_a, tok_b, text)
    ends = set(word_ends(text).tolist())
    assert len(pos_a) >= 0.9 * len(ends)
    for pa, pb in zip(pos_a, pos_b):
        prefix_a, prefix_b = tok_a.decode(ids_a[1:pa + 1]), tok_b.decode(ids_b[1:pb + 1])
        assert prefix_a == prefix_b and text.startswith(prefix_a) and len(prefix_a) in ends
    assert np.all(np.diff(pos_a) > 0) and np.all(np.diff(pos_b) > 0)


@needs_gemma3
def test_plain_words_all_align():
    rng = random.Random(0)
    vocabulary = "the cat sat on a mat and then it ran to house over under quickly jumped brown fox".split()
    text = " ".join(rng.choice(vocabulary) for _ in range(300))
    pos_a, _ = align_words(tokenizer("smollm2-135m"), tokenizer("gemma3-270m"), text)
    assert len(pos_a) >= 0.99 * 300


@needs_gemma3
def test_a_token_across_a_space_drops_the_word():
    # Gemma-3 has a single token "> </" that spans the end of the word "x>": only "</y" aligns.
    tok_a, tok_b = tokenizer("smollm2-135m"), tokenizer("gemma3-270m")
    pos_a, pos_b = align_words(tok_a, tok_b, "x> </y")
    assert len(pos_a) == 1
    assert tok_a.decode(tokenize_text(tok_a, "x> </y").ids[1:pos_a[0] + 1]) == "x> </y"


@needs_gemma3
def test_split_document_chunks_fit_and_keep_every_word():
    toks = [tokenizer("smollm2-135m"), tokenizer("gemma3-270m")]
    text = next(iter_documents("default"))[:6000]
    chunks = split_document(text, toks, [31, 40])
    assert len(chunks) > 5
    for chunk in chunks:
        assert chunk in text and chunk == chunk.strip()
        assert len(tokenize_text(toks[0], chunk, False).ids) <= 31 and len(tokenize_text(toks[1], chunk, False).ids) <= 40
    assert [w for c in chunks for w in c.split()] == text.split()


# --- affine stitching ----------------------------------------------------------------------------


@pytest.mark.parametrize("d_src,d_tgt", [(24, 40), (40, 24)])
def test_fit_affine_recovers_a_planted_map(d_src, d_tgt):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, d_src, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, d_src, dtype=torch.float64) + 3
    weight, bias = torch.randn(d_src, d_tgt, generator=g, dtype=torch.float64), torch.randn(d_tgt, generator=g, dtype=torch.float64)
    y = x @ weight + bias
    exact = fit_affine(x, y, ridge=0)
    assert torch.allclose(exact.weight, weight, atol=1e-9) and torch.allclose(exact.bias, bias, atol=1e-8)
    assert torch.allclose(exact.apply(x), y, atol=1e-8) and exact.apply(x.float()).dtype == torch.float32
    ridged = fit_affine(x, y)  # default ridge: a relative shrinkage of about 1e-4
    assert torch.allclose(ridged.weight, weight, rtol=0, atol=1e-3 * weight.abs().max())


def test_fit_affine_rejects_bad_input():
    x = torch.randn(10, 3)
    with pytest.raises(LayerflowError, match="ridge must be >= 0, not -1"):
        fit_affine(x, x, ridge=-1)
    with pytest.raises(LayerflowError, match="10 rows but x_tgt has 9"):
        fit_affine(x, x[:9])


def _aligned(acts_a, acts_b, words_per_document=64, n_layers=(2, 2)) -> AlignedActivations:
    n = len(next(iter(acts_a.values())))
    document = torch.arange(n) // words_per_document
    return AlignedActivations("model-a", "model-b", *n_layers, acts_a, acts_b, document % 5 == 4, document,
                              n_dropped=0, context_size=128, heldout_every=5)


def test_stitch_is_fit_on_train_words_only():
    g = torch.Generator().manual_seed(2)
    x_a, x_b = torch.randn(640, 12, generator=g), torch.randn(640, 20, generator=g)
    clean = _aligned({R0: x_a}, {R0: x_b})
    corrupted_b = torch.where(clean.heldout[:, None], 1e6 * torch.randn(640, 20, generator=g), x_b)
    corrupted = _aligned({R0: x_a}, {R0: corrupted_b})
    assert corrupted.n_heldout == 128 and not torch.equal(corrupted_b, x_b)
    for clean_map, corrupted_map in zip(fit_stitch(clean, R0, R0), fit_stitch(corrupted, R0, R0)):
        assert torch.equal(clean_map.weight, corrupted_map.weight) and torch.equal(clean_map.bias, corrupted_map.bias)


# --- statistics ----------------------------------------------------------------------------------


def test_benjamini_hochberg_is_step_up():
    assert benjamini_hochberg(np.array([0.01, 0.5, 0.02, 0.03])).tolist() == [True, False, True, True]
    # Step-up: 0.04 > 0.05 / 3 for the smallest, yet all three pass at rank 3 (0.04 <= 0.05).
    assert benjamini_hochberg(np.array([0.04, 0.04, 0.04])).all()
    assert benjamini_hochberg(np.array([0.02, 0.9])).tolist() == [True, False]  # 0.02 <= 0.05 * 1 / 2
    assert not benjamini_hochberg(np.array([0.03, 0.9])).any()


def test_linear_cka_definition_and_invariances():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(200, 10, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    assert linear_cka(z, 3 * z @ q + 5) == pytest.approx(1.0)
    w = torch.randn(200, 7, generator=g, dtype=torch.float64) + z[:, :7]
    zc, wc = z - z.mean(0), w - w.mean(0)
    feature_form = (zc.T @ wc).norm() ** 2 / ((zc.T @ zc).norm() * (wc.T @ wc).norm())
    assert linear_cka(z, w, debiased=False) == pytest.approx(float(feature_form))
    # The debiased estimator, recomputed from the unbiased HSIC's U-statistic form (Song et al. 2012).
    def hsic1(k, l):  # noqa: E306
        n = len(k)
        k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
        ones = torch.ones(n, dtype=torch.float64)
        return ((k * l).sum() + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (ones @ k @ l @ ones)) / (n * (n - 3))
    k, l = z @ z.T, w @ w.T
    expected = hsic1(k, l) / (hsic1(k, k) * hsic1(l, l)).sqrt()
    assert linear_cka(z, w) == pytest.approx(float(expected), rel=1e-9)


@pytest.mark.parametrize("latents,biased_at_least", [(4096, 0.5), (16_384, 0.75)])
def test_debiased_cka_is_near_zero_for_independent_wide_sparse_codes(latents, biased_at_least):
    # Independent sparse codes, many more latents than words: the plain estimator reads ~0.6 / ~0.83.
    g = torch.Generator().manual_seed(latents)
    n, k = 2048, 32
    codes = []
    for _ in range(2):
        z = torch.zeros(n, latents)
        z.scatter_(1, torch.rand(n, latents, generator=g).topk(k, dim=1).indices, torch.rand(n, k, generator=g) + 1)
        codes.append(z)
    assert linear_cka(*codes, debiased=False) > biased_at_least
    assert abs(linear_cka(*codes)) < 0.02
    assert linear_cka(codes[0], codes[0] * 3) == pytest.approx(1.0)


def test_document_permutations_move_whole_documents():
    documents = torch.tensor([0] * 5 + [1] * 7 + [2] * 6 + [3] * 2 + [4] * 6)
    rows, perms = document_permutations(documents, max_words=100, n_perm=20, seed=0)
    # w = the median length (6): documents 0 and 3 (5 and 2 words) are left out, the others give their first 6.
    assert rows.tolist() == [*range(5, 11), *range(12, 18), *range(20, 26)]
    kept_docs = documents[rows].reshape(-1, 6)
    assert kept_docs[:, 0].tolist() == [1, 2, 4] and (kept_docs == kept_docs[:, :1]).all()
    for perm in perms:
        blocks = perm.reshape(-1, 6)
        assert (blocks // 6 == blocks[:, :1] // 6).all() and (blocks % 6 == torch.arange(6)).all()
    rows, perms = document_permutations(torch.zeros(10, dtype=torch.long), 100, 5, 0)
    assert rows.tolist() == list(range(10)) and perms == []  # one document: nothing to permute


def test_document_permutations_keep_p_values_honest_under_dependence():
    # Two unrelated signals that each hold one value per document (e.g. its topic): a permutation of
    # single words calls them correlated, a permutation of whole documents does not.
    g = torch.Generator().manual_seed(0)
    n_docs, w = 20, 50
    documents = torch.arange(n_docs).repeat_interleave(w)
    a_train, b_train, a, b = (torch.randn(n_docs, 40, generator=g).repeat_interleave(w, 0) for _ in range(4))
    by_documents = match_features(a_train, b_train, a, b, n_perm=200, documents=documents)
    by_words = match_features(a_train, b_train, a, b, n_perm=200)
    # (the p-values alone: the absolute floor of 0.5 on the correlation would hide the difference)
    assert (by_documents.p_value < 0.05).mean() < 0.1
    assert (by_words.p_value < 0.05).mean() > 0.3  # one-sided: nearly every positive chance correlation


def test_paired_svcca_finds_a_shared_geometry_and_reports_its_components():
    g = torch.Generator().manual_seed(1)
    n, d_a, d_b = 400, 64, 80
    rows_a = torch.randn(n, d_a, generator=g)
    to_b = torch.randn(d_a, d_b, generator=g)
    same = paired_svcca(rows_a, rows_a @ to_b + 0.01 * torch.randn(n, d_b, generator=g), n_perm=50)
    assert same.score > 0.95 and same.p_value == pytest.approx(1 / 51)
    assert all(1 < k <= n // 4 for k in same.components)  # not just one
    unrelated = paired_svcca(rows_a, torch.randn(n, d_b, generator=g), n_perm=50)
    assert unrelated.p_value > 0.05


# --- planted cross-"model" transfer --------------------------------------------------------------


def _mapped_sae(sae_a, to_b, shift):
    """SAE_A moved into B's space through x_B = x_A @ to_b + shift (to_b has full row rank)."""
    d_in, d_sae = to_b.shape[1], sae_a.cfg.d_sae
    sae_b = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=sae_a.cfg.k, apply_b_dec_to_input=True))
    with torch.no_grad():
        sae_b.W_dec.copy_(sae_a.W_dec @ to_b)
        sae_b.b_dec.copy_(sae_a.b_dec @ to_b + shift)
        sae_b.W_enc.copy_(torch.linalg.pinv(to_b) @ sae_a.W_enc)  # to_b @ pinv(to_b) = I: same codes
        sae_b.b_enc.zero_()
    return sae_b


def _planted_map():
    """Model B is model A through x_B = x_A @ to_b + shift."""
    g = torch.Generator().manual_seed(4)
    return torch.randn(128, 160, generator=g) / 128**0.5, torch.randn(160, generator=g)


@pytest.fixture(scope="module")
def planted_matrix():
    planted = planted_layers([1.0, 0.0], gains=[1.0, 3.0], d=128, n_features=64, n_tokens=3200, seed=0)
    to_b, shift = _planted_map()
    x_a = dict(zip((R0, R1), planted.activations))
    x_b = {hook: x @ to_b + shift for hook, x in x_a.items()}
    saes_a = {R0: true_sae(planted, 0), R1: true_sae(planted, 1)}
    saes_b = {hook: _mapped_sae(sae, to_b, shift) for hook, sae in saes_a.items()}
    aligned = _aligned(x_a, x_b)
    return cross_model_matrix(saes_a, saes_b, aligned, n_perm=100, n_perm_features=200), planted, aligned


def test_planted_shared_layer_transfers(planted_matrix):
    matrix, planted, aligned = planted_matrix
    for i in (0, 1):  # A's layer i vs B = A's layer i through an affine map into width 160
        pair = matrix.pair(i, i)
        assert pair.stitch_only_explained_variance > 0.99
        assert pair.target_sae_explained_variance > 0.9
        assert pair.relative_transfer == pytest.approx(1.0, abs=0.03)
        assert pair.cka > 0.9 and pair.cka_p_value == pytest.approx(1 / 101)
        assert pair.fraction_features_with_partner > 0.95 and pair.matched_feature_correlation_mean > 0.9
        matched = matrix.extras["matched_features"][matrix.sources[i].hook_name, matrix.targets[i].hook_name]
        assert np.mean(matched.source_index == matched.target_index) > 0.95  # the planted correspondence
    assert matrix.settings["n_heldout_words"] == aligned.n_heldout == 640 and matrix.settings["n_train_words"] == 2560


def test_planted_unrelated_layer_does_not_transfer(planted_matrix):
    matrix, planted, _ = planted_matrix
    assert planted.overlap(0, 1) == 0
    shared, unrelated = matrix.pair(0, 0), matrix.pair(1, 0)  # A's layer 1 has no feature of layer 0
    # The round trip alone keeps some variance even here: it shrinks x_B along spurious train-set
    # canonical directions (about d / n_train); the SAE removes it.
    assert unrelated.relative_transfer < 0.1 and unrelated.stitch_only_explained_variance < 0.25
    assert unrelated.cka < 0.3 * shared.cka and unrelated.cka_p_value > 0.05
    assert unrelated.fraction_features_with_partner < 0.05
    assert unrelated.matched_feature_correlation_mean < 0.3 * shared.matched_feature_correlation_mean


def test_same_depth_pairs_and_summary(planted_matrix):
    matrix = planted_matrix[0]
    assert same_depth_pairs(matrix) == [(0, 0), (1, 1)]
    summary = compare_same_depth(matrix, "relative_transfer")
    assert summary.same_depth_n == 2 and summary.all_n == 4
    assert summary.same_depth_mean > summary.all_mean + 0.3
    assert summary.all_mean == pytest.approx(np.nanmean(np.clip(matrix["relative_transfer"], 0, 1)))
    # the gap's interval: the same two means on every resample of the held-out documents
    r = np.clip(matrix.replicates["relative_transfer"], 0, 1)
    gaps = (r[:, 0, 0] + r[:, 1, 1]) / 2 - r.mean((1, 2))
    assert summary.difference == pytest.approx(summary.same_depth_mean - summary.all_mean)
    assert (summary.difference_low, summary.difference_high) == pytest.approx(tuple(np.quantile(gaps, [0.025, 0.975])))
    # averages are bounded: one pair at -50 (a target SAE that explains almost nothing) counts as 0, not -50
    worse = TransferMatrix("cross_model", matrix.sources, matrix.targets,
                           {"relative_transfer": np.array([[0.9, -50.0], [0.1, 0.8]])})
    bounded = compare_same_depth(worse, "relative_transfer")
    assert bounded.all_mean == pytest.approx((0.9 + 0 + 0.1 + 0.8) / 4) and bounded.same_depth_mean == pytest.approx(0.85)


def test_resamples_redraw_whole_held_out_documents(planted_matrix):
    matrix, _, aligned = planted_matrix
    assert "whole held-out documents" in matrix.settings["intervals"]
    for name in ("stitched_explained_variance", "target_sae_explained_variance", "relative_transfer"):
        low, high = matrix.intervals[name]
        assert matrix.replicates[name].shape == (200, 2, 2)
        assert (low <= matrix[name] + 1e-9).all() and (matrix[name] <= high + 1e-9).all(), name
    # a resample equals the figure recomputed on the drawn documents (duplicates included), independently
    documents = aligned.document[aligned.heldout]
    ids = torch.unique_consecutive(documents)
    weights = bootstrap_weights(len(ids), 200, 0)
    r = 3
    rows = torch.cat([torch.nonzero(documents == d).flatten().repeat(int(w)) for d, w in zip(ids, weights[r])])
    held = aligned.acts_b[R0][aligned.heldout].double()
    x_b = held[rows]
    sae_b = _mapped_sae(true_sae(planted_matrix[1], 0), *_planted_map())
    x_hat = sae_b(x_b.float()).double()
    ev = 1 - (x_b - x_hat).square().sum() / (x_b - held.mean(0)).square().sum()  # centred on all held-out words
    assert matrix.replicates["target_sae_explained_variance"][r, 0, 0] == pytest.approx(ev.item(), abs=1e-5)
    # CKA: the sums over the drawn CKA words' pairs of the U-centred Grams of all CKA words (a word paired with
    # a copy of itself adds 0: the diagonal), recomputed on the drawn rows
    sae_a = true_sae(planted_matrix[1], 0)
    z_a, z_b = sae_a.encode(aligned.acts_a[R0][aligned.heldout]).detach(), sae_b.encode(held.float()).detach()
    cka_rows, _ = document_permutations(documents, 2048, 100, 0)
    kc, lc = centered_gram(z_a[cka_rows]), centered_gram(z_b[cka_rows])
    drawn = torch.cat([torch.nonzero(documents[cka_rows] == d).flatten().repeat(int(w)) for d, w in zip(ids, weights[r])])
    k, l = kc[drawn][:, drawn], lc[drawn][:, drawn]
    cka = (k * l).sum() / ((k * k).sum() * (l * l).sum()).sqrt()
    assert matrix.replicates["cka"][r, 0, 0] == pytest.approx(cka.item(), rel=1e-9)
    for name in ("cka", "matched_feature_correlation_mean", "fraction_features_with_partner"):
        low, high = matrix.intervals[name]
        assert (low <= matrix[name] + 1e-9).all() and (matrix[name] <= high + 1e-9).all(), name
        assert (low[0, 0] < high[0, 0]) or name == "fraction_features_with_partner", name
    assert set(matrix.intervals) | set(matrix.settings["no_interval"]) == set(matrix.metrics)


def test_matching_only_same_depth_pairs_leaves_the_rest_nan(planted_matrix):
    full, planted, aligned = planted_matrix
    saes_a = {R0: true_sae(planted, 0), R1: true_sae(planted, 1)}
    g = torch.Generator().manual_seed(4)
    to_b, shift = torch.randn(128, 160, generator=g) / 128**0.5, torch.randn(160, generator=g)
    saes_b = {hook: _mapped_sae(sae, to_b, shift) for hook, sae in saes_a.items()}
    same = cross_model_matrix(saes_a, saes_b, aligned, n_perm=100, n_perm_features=200, match_pairs="same_depth")
    matched = ("fraction_features_with_partner", "matched_feature_correlation_mean", "paired_svcca",
               "paired_svcca_p_value", "paired_svcca_pairs", "paired_svcca_components")
    for name in same.metrics:
        for i in (0, 1):
            for j in (0, 1):
                if name in matched and i != j:
                    assert np.isnan(same[name][i, j])  # not matched
                else:
                    assert same[name][i, j] == pytest.approx(full[name][i, j], nan_ok=True)  # as when matching all
    assert set(same.extras["matched_features"]) == {(R0, R0), (R1, R1)}
    with pytest.raises(LayerflowError, match="Unknown match_pairs 'some'. Valid: all, same_depth, none"):
        cross_model_matrix(saes_a, saes_b, aligned, match_pairs="some")


def test_same_depth_pairs_compare_relative_depth():
    site = lambda model, layer, n: SiteId(model, f"blocks.{layer}.hook_resid_post", layer, n)  # noqa: E731
    sources, targets = [site("a", layer, 30) for layer in (0, 10, 29)], [site("b", layer, 18) for layer in range(0, 18, 3)]
    metrics = {"cka": np.zeros((3, 6))}
    pairs = same_depth_pairs(TransferMatrix("cross_model", sources, targets, metrics))
    for i, j in pairs:
        gaps = [abs(t.relative_depth - sources[i].relative_depth) for t in targets]
        assert gaps[j] == min(gaps)
    assert pairs[0] == (0, 0) and pairs[2] == (2, 5)


def test_matrix_errors_name_the_bad_value(planted_matrix):
    _, planted, aligned = planted_matrix
    sae = true_sae(planted, 0)
    with pytest.raises(LayerflowError, match="model-a at 'blocks.7.hook_resid_post'"):
        cross_model_matrix({"blocks.7.hook_resid_post": sae}, {R0: sae}, aligned)
    with pytest.raises(LayerflowError, match=f"'{R0}' reads width 128, but the activations there have width 160"):
        cross_model_matrix({R0: sae}, {R0: sae}, aligned)


def test_capture_needs_tokenizers():
    twin = tiny_twin("gpt2-twin")
    with pytest.raises(LayerflowError, match="'gpt2-twin' has no tokenizer"):
        capture_aligned(twin, [R0], twin, [R0], ["some text"])


# --- the two real models -------------------------------------------------------------------------


def _short_documents(n: int, chars: int = 700) -> list[str]:
    """The first paragraphs (about `chars` characters) of the first n documents of the shipped corpus."""
    docs = []
    for doc in iter_documents("default"):
        cut = doc.find("\n\n", chars)
        docs.append(doc[: cut if cut > 0 else chars])
        if len(docs) == n:
            return docs


def _reference(loaded, hooks, side, docs, tokenizers, max_tokens, words_per_document):
    """Activations at aligned words, one chunk per forward pass through the whole model."""
    rows = {h: [] for h in hooks}
    for doc in docs:
        n = 0
        for chunk in split_document(doc, tokenizers, [max_tokens, max_tokens]):
            pos = align_words(*tokenizers, chunk)[side][:words_per_document - n]
            tokens = torch.from_numpy(tokenize_text(loaded.tokenizer, chunk).ids)[None]
            _, cache = loaded.model.run_with_cache(tokens, names_filter=lambda name: name in rows)
            for hook in hooks:
                rows[hook].append(cache[hook][0, pos])
            n += len(pos)
            if n == words_per_document:
                break
    return {h: torch.cat(v) for h, v in rows.items()}


@pytest.mark.slow
@needs_gemma3
def test_capture_and_matrix_on_real_models(smollm2, gemma3, tmp_path):
    hooks_a, hooks_b = ["blocks.3.hook_resid_post", "blocks.5.mlp.hook_in"], ["blocks.2.hook_resid_post", "blocks.4.hook_mlp_out"]
    docs = _short_documents(3)
    aligned = capture_aligned(smollm2, hooks_a, gemma3, hooks_b, docs, context_size=48, max_words_per_document=80,
                              heldout_every=3)
    assert aligned.document.bincount().tolist() == [80, 80, 80]
    assert aligned.split == ["train"] * 160 + ["heldout"] * 80
    for acts, widths in ((aligned.acts_a, 576), (aligned.acts_b, 640)):
        for x in acts.values():
            assert x.shape == (240, widths) and x.dtype == torch.float32 and torch.isfinite(x).all()
    # Each chunk run on its own, unpadded and to the end, gives the same activations at its aligned words.
    for side, (loaded, hooks, acts) in enumerate(((smollm2, hooks_a, aligned.acts_a), (gemma3, hooks_b, aligned.acts_b))):
        expected = _reference(loaded, hooks, side, docs, [smollm2.tokenizer, gemma3.tokenizer], 47, 80)
        for hook in hooks:
            assert torch.allclose(expected[hook], acts[hook], atol=1e-4, rtol=1e-4)
    saes_a = {h: StandardSAE(StandardSAEConfig(d_in=576, d_sae=32)) for h in hooks_a}
    saes_b = {h: StandardSAE(StandardSAEConfig(d_in=640, d_sae=32)) for h in hooks_b}
    matrix = cross_model_matrix(saes_a, saes_b, aligned, n_perm=10, n_perm_features=10)
    assert np.isfinite(matrix["stitch_only_explained_variance"]).all()
    assert matrix.sources == [SiteId("smollm2-135m", hooks_a[0], 3, 30, "resid_post"),
                              SiteId("smollm2-135m", hooks_a[1], 5, 30, "mlp_in")]
    assert matrix.targets == [SiteId("gemma3-270m", hooks_b[0], 2, 18, "resid_post"),
                              SiteId("gemma3-270m", hooks_b[1], 4, 18, "mlp_out")]
    assert set(matrix.extras["matched_features"]) == {(a, b) for a in hooks_a for b in hooks_b}
    # One held-out document: nothing to permute, so no p-values rather than p-values that mean nothing.
    assert np.isnan(matrix["cka_p_value"]).all() and np.isnan(matrix["fraction_features_with_partner"]).all()
    assert matrix.settings["permutations"].startswith("none") and np.isfinite(matrix["cka"]).all()
    json_path, *_ = matrix.write(tmp_path)
    assert TransferMatrix.read(json_path).equals(matrix)


@pytest.mark.slow
@needs_gemma3
def test_cli_cross_model_between_two_trained_runs(smollm2, gemma3, tmp_path):
    from conftest import run_cli
    from layerflow.capture import CaptureConfig, capture
    from layerflow.train import LayerSchedule, TrainConfig, train

    schedule = LayerSchedule("topk", {"expansion_factor": 1, "k": 8, "lr": 1e-3})
    for loaded, layers in ((smollm2, [3, 20]), (gemma3, [2, 12])):
        store = tmp_path / loaded.name / "capture"
        capture(CaptureConfig(model=loaded.name, layers=layers, n_tokens=1024, context_size=64), store, loaded=loaded)
        train(TrainConfig(str(store), schedule=schedule, steps=3, batch_tokens=256), tmp_path / loaded.name / "train",
              evaluate=False)
    run_a, run_b, out = tmp_path / "smollm2-135m" / "train", tmp_path / "gemma3-270m" / "train", tmp_path / "cross"
    result = run_cli("transfer", str(run_a), "--cross-model", str(run_b), "--words", "600", "--out", str(out))
    assert result.returncode == 0, result.stderr
    matrix = TransferMatrix.read(out)
    assert matrix.kind == "cross_model" and [s.layer for s in matrix.sources] == [3, 20]
    assert [t.layer for t in matrix.targets] == [2, 12] and matrix.settings["n_heldout_words"] > 0
    depth = json.loads((out / "depth_comparison.json").read_text())
    assert depth["stitched_explained_variance"]["same_depth_n"] == 2 and depth["stitched_explained_variance"]["all_n"] == 4
    assert "3.resid_post" in result.stdout
    bad = run_cli("transfer", str(run_a), "--cross-model", str(tmp_path / "nowhere"))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "nowhere" in bad.stderr


def test_floors_and_ceilings_at_the_targets_with_a_twin(planted_matrix):
    _, planted, aligned = planted_matrix
    g = torch.Generator().manual_seed(4)
    to_b, shift = torch.randn(128, 160, generator=g) / 128**0.5, torch.randn(160, generator=g)
    saes_a = {R0: true_sae(planted, 0), R1: true_sae(planted, 1)}
    saes_b = {hook: _mapped_sae(sae, to_b, shift) for hook, sae in saes_a.items()}
    twin = _mapped_sae(true_sae(planted, 0), to_b, shift)  # a perfect twin of SAE_B at R0
    matrix = cross_model_matrix(saes_a, saes_b, aligned, n_perm=50, n_perm_features=200, match_pairs="none",
                                twins_b={R0: twin})
    refs = matrix.references
    assert refs["ceiling"]["relative_transfer"][R0] == pytest.approx(1.0, abs=1e-6)
    assert refs["ceiling"]["cka"][R0] == pytest.approx(1.0, abs=1e-6)
    assert refs["ceiling"]["fraction_features_with_partner"][R0] > 0.95
    # The floor: SAE_B rotated inside B's principal subspace shares no feature with SAE_B.
    # CKA keeps some of the data's own geometry even without shared features: its floor is not 0.
    assert refs["floor"]["relative_transfer"][R0] < 0.6 and refs["floor"]["cka"][R0] < 0.5
    assert refs["floor"]["fraction_features_with_partner"][R0] < 0.2
    assert set(refs["floor"]["cka"]) == {R0}  # only where a twin was given
    assert TransferMatrix.from_dict(json.loads(json.dumps(matrix.to_dict()))).references == refs
