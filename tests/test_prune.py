"""Sparse teachers: global magnitude pruning reaches the target sparsity, masks survive
fine-tuning, gradual schedules are cumulative, and permanent weights hold real zeros."""

import pytest
import torch

from saliency_cache.errors import SatError
from trainer.models import create_model
from trainer.prune import make_permanent, prunable, prune_global, prune_schedule, sparsity


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet10", 4, width=4)


def _weights(model):
    return torch.cat([getattr(m, n).detach().flatten() for m, n in prunable(model)])


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def test_reaches_target_and_keeps_it_when_permanent():
    model = _model()
    assert sparsity(model) == 0.0
    prune_global(model, 0.95)
    s = sparsity(model)
    assert 0.95 <= s < 0.95 + 1e-3
    make_permanent(model)
    assert sparsity(model) == s
    keys = model.state_dict().keys()
    assert not any(k.endswith(("_orig", "_mask")) for k in keys)
    # The exported weights load into a plain, never-pruned model of the same architecture.
    fresh = _model(seed=5)
    fresh.load_state_dict(model.state_dict())
    assert sparsity(fresh) == s
    x, _ = _batch()
    with torch.no_grad():
        out = fresh.eval()(x)
    assert out.shape == (8, 4) and torch.isfinite(out).all()


def test_ranking_is_global_by_magnitude():
    model = _model()
    before = _weights(model).abs()
    prune_global(model, 0.8)
    after = _weights(model)
    pruned = after == 0
    # Every surviving weight is at least as large as every removed one, across all layers.
    assert before[~pruned].min() >= before[pruned].max()
    # Layers are pruned unevenly (a per-layer rule would give each layer exactly 80 %).
    per_layer = [float((getattr(m, n) == 0).float().mean()) for m, n in prunable(model)]
    assert max(per_layer) - min(per_layer) > 0.05


def test_masks_survive_optimizer_steps():
    model = _model()
    prune_global(model, 0.9)
    masks = [m.weight_mask.clone() for m, _ in prunable(model)]
    kept_before = _weights(model)[_weights(model) != 0].clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    for step in range(3):
        x, y = _batch(seed=step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (m, n), mask in zip(prunable(model), masks, strict=True):
        assert (getattr(m, n)[mask == 0] == 0).all()
    assert sparsity(model) >= 0.9
    # Fine-tuning does move the surviving weights.
    kept_after = _weights(model)[torch.cat([mk.flatten() for mk in masks]) == 1]
    assert not torch.equal(kept_before, kept_after)


@pytest.mark.parametrize("permanent_between", [True, False])
def test_gradual_schedule_is_cumulative(permanent_between):
    model = _model()
    seen = []
    for amount in prune_schedule(0.95, steps=3):
        prune_global(model, amount)
        seen.append(sparsity(model))
        if permanent_between:
            make_permanent(model)
    make_permanent(model)
    expected = prune_schedule(0.95, 3)
    for got, want in zip(seen, expected, strict=True):
        assert want <= got < want + 1e-3
    assert sparsity(model) >= 0.95


def test_schedule_values():
    s = prune_schedule(0.95, 3)
    assert len(s) == 3 and s[-1] == 0.95
    assert s == sorted(s) and s[0] > 0
    # Each step removes the same fraction of the weights still alive.
    alive = [1.0] + [1.0 - a for a in s]
    ratios = [alive[i + 1] / alive[i] for i in range(3)]
    assert max(ratios) - min(ratios) < 1e-9
    assert prune_schedule(0.5, 1) == [0.5]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: prune_global(m, 1.0), "1.0"),
        (lambda m: prune_global(m, -0.1), "-0.1"),
        (lambda m: prune_schedule(0.0, 3), "0.0"),
        (lambda m: prune_schedule(0.9, 0), "got 0"),
    ],
)
def test_bad_amounts_raise(call, match):
    with pytest.raises(SatError, match=match):
        call(_model())


def test_a_checkpoint_taken_mid_pruning_loads_as_the_masked_model(tmp_path):
    # Between pruning steps the teacher's checkpoints hold weight_orig / weight_mask; they
    # must load (for evaluation or as a teacher) as the network the masks define.
    from trainer.checkpoint import Checkpoint, load_model, save_checkpoint

    model = _model()
    prune_global(model, 0.6)
    with torch.no_grad():
        for m, _ in prunable(model):
            m.weight_orig.add_(0.5)  # pruned positions keep non-zero originals, as in training
    state = model.state_dict()
    assert any(k.endswith("weight_orig") for k in state)
    path = tmp_path / "mid.safetensors"
    save_checkpoint(path, Checkpoint(arch=model.arch, model_state=state))
    loaded, _ = load_model(path, "cpu")
    assert 0.6 <= sparsity(loaded) < 0.6 + 1e-3
    x, _ = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
