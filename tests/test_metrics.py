"""Correct counts and Etmann et al.'s alignment forms, checked against hand computations."""

import pytest
import torch
import torch.nn as nn

from tests.nets import Linear
from trainer.attacks.evaluate import evaluate
from trainer.attacks.metrics import alignment, alignment_forms, num_correct


def linear_case(seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 2 * 4 * 4, generator=g)
    net = Linear(w, torch.randn(3, generator=g))
    x = torch.rand(b, 2, 4, 4, generator=g)
    y = torch.randint(0, 3, (b,), generator=g)
    return net, x, y, w


def test_num_correct():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.1, 0.2]])
    assert num_correct(logits, torch.tensor([0, 1, 1, 0])) == 2
    assert num_correct(logits, torch.tensor([0, 1, 0, 1])) == 4


def test_alignment_of_a_linear_model_is_projection_on_the_weight_row():
    net, x, y, w = linear_case()
    got = alignment(net, x, y)
    rows = w[y].double()
    expected = ((x.flatten(1).double() * rows).sum(1).abs() / rows.norm(dim=1)).float()
    assert got.shape == (6,) and got.dtype == x.dtype
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    # The bias does not matter, and neither does the scale of the weights.
    net2 = Linear(3.0 * w, torch.zeros(3))
    assert torch.allclose(alignment(net2, x, y), expected, rtol=1e-4, atol=1e-6)
    assert net.w.grad is None and net.b.grad is None


def test_alignment_batched_equals_one_by_one():
    net, x, y, _ = linear_case(seed=1)
    whole = alignment(net, x, y)
    single = torch.cat([alignment(net, x[i : i + 1], y[i : i + 1]) for i in range(len(y))])
    assert torch.allclose(whole, single)


def test_zero_gradient_gives_zero_alignment():
    net, x, y, w = linear_case(seed=2)
    w0 = w.clone()
    w0[1] = 0.0  # class 1's logit ignores the input
    net0 = Linear(w0, torch.zeros(3))
    y = torch.tensor([1, 0, 1, 2, 1, 0])
    got = alignment(net0, x, y)
    assert torch.isfinite(got).all()
    assert (got[y == 1] == 0).all() and (got[y != 1] > 0).all()


def test_alignment_forms_of_a_linear_model_match_the_closed_form():
    """logit: g = W[y]; margin (Etmann's Ψ): g = W[y] - W[j*], j* the runner-up class;
    projection |<x, g>| / ||g||, cosine that divided by ||x||."""
    net, x, y, w = linear_case(seed=4)
    got = alignment_forms(net, x, y)
    xf = x.flatten(1).double()
    z = net(x).detach().double()
    runner = z.scatter(1, y[:, None], float("-inf")).argmax(1)
    for name, g in (("logit", w[y].double()), ("margin", (w[y] - w[runner]).double())):
        proj = (xf * g).sum(1).abs() / g.norm(dim=1)
        assert torch.allclose(got[f"{name}_projection"], proj, rtol=1e-5)
        assert torch.allclose(got[f"{name}_cosine"], proj / xf.norm(dim=1), rtol=1e-5)
    assert torch.equal(got["logit_projection"].float(), alignment(net, x, y))
    assert (got["logit_cosine"] <= 1).all() and (got["margin_cosine"] <= 1).all()


def test_alignment_means_and_medians_do_not_depend_on_the_batch_size():
    net, x, y, _ = linear_case(seed=5, b=7)
    ref = alignment_forms(net, x, y)
    for bs in (1, 3, 7):
        res = evaluate(net, x, y, batch_size=bs)
        for form, v in res["alignments"].items():
            assert v["mean"] == pytest.approx(ref[form].mean().item(), rel=1e-9)
            assert v["median"] == pytest.approx(ref[form].median().item(), rel=1e-9)
        assert res["alignment"] == pytest.approx(ref["logit_projection"].mean().item(), rel=1e-5)


def test_alignment_over_batches_uses_eval_mode_and_restores_it():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 16, 3),
    )
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 2, 4, 4, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    net.train()
    got = evaluate(net, x, y, batch_size=5)["alignment"]
    assert net.training and net[1].training
    net.eval()
    assert got == pytest.approx(alignment(net, x, y).mean().item(), rel=1e-5)
    # uint8 images are scaled to [0, 1] first.
    x8 = (x * 255).round().to(torch.uint8)
    assert evaluate(net, x8, y)["alignment"] == pytest.approx(
        alignment(net, x8.float() / 255, y).mean().item(), rel=1e-5
    )
