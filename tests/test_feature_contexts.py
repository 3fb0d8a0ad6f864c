import torch

from layerflow.dictionaries.top_activations import TopActivations, contexts, top_activations


def test_streaming_top_activations_equal_a_single_topk_over_everything(tmp_path):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1000, 16, generator=g).relu()
    latents[:, 3] = 0  # a latent that never fires
    positions = torch.randperm(5000, generator=g)[:1000]
    top = top_activations(lambda x: x, iter(zip(latents.split(97), positions.split(97))), d_sae=16, k=5)
    values, rows = latents.topk(5, dim=0)
    firing = [f for f in range(16) if f != 3]
    assert torch.equal(top.values[firing], values.T[firing])
    assert torch.equal(top.positions[firing], positions[rows].T[firing])
    assert (top.positions[3] == -1).all() and (top.values[3] == 0).all()
    top.save(tmp_path / "top.safetensors")
    back = TopActivations.load(tmp_path / "top.safetensors")
    assert torch.equal(back.values, top.values) and torch.equal(back.positions, top.positions)
    assert top.top_features(1) == [int(latents.max(0).values.argmax())]


def test_contexts_stay_inside_the_sequence_and_mark_the_firing_token():
    tokens = torch.arange(40).reshape(4, 10)  # 4 sequences of 10 tokens
    top = TopActivations.empty(2, 2)
    top.update(torch.tensor([[5.0, 0.0], [1.0, 0.0]]), torch.tensor([21, 12]))
    found = contexts(top, 0, tokens, tokenizer=None, before=3, after=2)
    assert [c.position for c in found] == [21, 12]
    assert found[0].before == ["<20>"] and found[0].token == "<21>" and found[0].after == ["<22>", "<23>"]
    assert found[1].before == ["<10>", "<11>"]  # position 12 is the third token of sequence 1
    assert found[0].text() == "<20>[[<21>]]<22><23>"
    assert contexts(top, 1, tokens, tokenizer=None) == []
