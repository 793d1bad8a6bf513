"""Evaluation attacks and their shared primitives, on tiny CNNs in [0, 1] pixel space."""

import functools
import sys

import pytest
import torch
import torch.nn.functional as F

from saliency_cache.errors import MismatchError, SatError
from tests import nets
from tests.nets import Linear
from trainer.attacks import (
    ATTACKS,
    input_grad,
    list_attacks,
    parse_attack,
    pgd,
    saliency_attack,
    saliency_attack_from_map,
    trades_kl_attack,
    uniform_noise,
)
from trainer.attacks.evaluate import evaluate

EPS = 8 / 255
SPECS = [
    "fgsm",
    "pgd",
    "pgd3",
    "trades",
    "trades2",
    "uniform",
    "saliency",
    "saliency-map",
    "autoattack",
]


pytestmark = pytest.mark.usefixtures("one_thread")


# 6 channels and no pooling: the linear layer sees every position of the 8x8 inputs.
tiny_net = functools.partial(nets.tiny_net, classes=4, width=6, pool=False)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def blobs(n, seed, a=0.03, sigma=0.1):
    """Two Gaussian blobs in image space: 0.5 +/- a * v + noise, v a fixed +/-1 pattern."""
    v = (torch.rand(3, 8, 8, generator=gen(123)) < 0.5).float() * 2 - 1
    g = gen(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.5 + (2 * y - 1).float()[:, None, None, None] * a * v
    return (x + sigma * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained for ~1 s on the blobs, plus held-out data; eval mode."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = blobs(256, seed=1)
    net = tiny_net(classes=2, bn=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(8):
        for i in range(0, 256, 32):
            loss = F.cross_entropy(net(x[i : i + 32]), y[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(n)
    net.eval()
    for p in net.parameters():
        p.grad = None
    xt, yt = blobs(400, seed=2)
    return net, xt, yt


def acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def random_batch(b=4, seed=0):
    g = gen(seed)
    x = torch.rand(b, 3, 8, 8, generator=g)
    x[0, 0] = 0.0  # pixels on the boundary of [0, 1] must stay inside it
    x[1, 1] = 1.0
    maps = (torch.randint(0, 2, (b, 1, 8, 8), generator=g) * 2 - 1).to(torch.int8)
    return x, maps


# --------------------------------------------------------------------------- contract


def test_specs_cover_the_registry():
    assert {type(parse_attack(s)).name for s in SPECS} == set(ATTACKS.names())


# AutoAttack runs in eval mode only: torchattacks switches the model to eval itself.
@pytest.mark.parametrize(
    "spec, training",
    [(s, t) for s in SPECS for t in (False, True) if not (t and s == "autoattack")],
)
def test_attack_contract(spec, training):
    if spec == "autoattack":
        pytest.importorskip("torchattacks")
    net = tiny_net(gain=10.0)
    net.train(training)
    x, maps = random_batch()
    with torch.no_grad():
        y = net.eval()(x).argmax(1)  # labels the model gets right: the attack has work to do
    net.train(training)
    atk = parse_attack(spec)
    rng_before = torch.get_rng_state()
    x_adv = atk(net, x, y, eps=EPS, generator=gen(3), maps=maps)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)
    assert net.training == training and all(m.training == training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before), "the global RNG must not be used"
    # Deterministic for a seed (BN in train mode depends on the batch only).
    assert torch.equal(x_adv, atk(net, x, y, eps=EPS, generator=gen(3), maps=maps))


@pytest.mark.parametrize("spec", ["pgd", "trades", "uniform"])
def test_random_attacks_depend_on_the_seed(spec):
    net = tiny_net().eval()
    x, _ = random_batch()
    y = torch.zeros(4, dtype=torch.long)
    atk = parse_attack(spec)
    a = atk(net, x, y, eps=EPS, generator=gen(1))
    assert not torch.equal(a, atk(net, x, y, eps=EPS, generator=gen(2)))


def test_zero_budget_returns_the_input_and_negative_budget_is_refused():
    net = tiny_net().eval()
    x, maps = random_batch()
    y = torch.zeros(4, dtype=torch.long)
    for spec in SPECS:
        assert torch.equal(parse_attack(spec)(net, x, y, eps=0.0, generator=gen(), maps=maps), x)
    with pytest.raises(SatError, match="-0.1"):
        parse_attack("pgd")(net, x, y, eps=-0.1, generator=gen())


def test_attacks_work_inside_no_grad():
    net = tiny_net().eval()
    x, _ = random_batch()
    y = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        inside = parse_attack("pgd5")(net, x, y, eps=EPS, generator=gen(4))
    assert torch.equal(inside, parse_attack("pgd5")(net, x, y, eps=EPS, generator=gen(4)))


# --------------------------------------------------------------------------- strength


def test_accuracy_ordering_on_a_trained_model(trained):
    net, x, y = trained
    n = y.numel()
    tol = 2 / n  # two samples
    clean = acc(net, x, y)
    assert clean > 0.95
    res = {
        s: acc(net, parse_attack(s)(net, x, y, eps=EPS, generator=gen(5)), y)
        for s in ("fgsm", "pgd5", "pgd20", "pgd40", "uniform", "trades", "saliency")
    }
    assert res["pgd5"] < clean - 0.3, "PGD at 8/255 should break this model"
    assert res["pgd5"] <= res["fgsm"] + tol <= clean + tol
    assert res["pgd20"] <= res["pgd5"] + tol
    assert res["pgd40"] <= res["pgd20"] + tol
    assert res["pgd5"] <= res["uniform"] and res["uniform"] >= clean - 0.05
    assert res["trades"] < clean - 0.1 and res["saliency"] < clean - 0.3


def test_pgd_agrees_with_torchattacks(trained):
    torchattacks = pytest.importorskip("torchattacks")
    net, x, y = trained
    for eps in (4 / 255, 8 / 255):
        ours = pgd(net, x, y, eps=eps, steps=10, step_size=eps / 4, random_start=False)
        ref = torchattacks.PGD(net, eps=eps, alpha=eps / 4, steps=10, random_start=False)(x, y)
        assert abs(acc(net, ours, y) - acc(net, ref, y)) <= 0.005


def test_restarts_keep_the_example_that_fools_the_model(trained):
    net, x, y = trained
    eps = 4 / 255
    kw = dict(eps=eps, steps=3, step_size=eps / 2, random_start=True)
    best = pgd(net, x, y, restarts=3, generator=gen(6), **kw)
    # The three runs draw their starts one after another from the same generator.
    g = gen(6)
    runs = [pgd(net, x, y, generator=g, **kw) for _ in range(3)]
    with torch.no_grad():
        fooled = torch.stack([net(r).argmax(1) != y for r in runs])
        assert torch.equal(net(best).argmax(1) != y, fooled.any(0))
    assert acc(net, best, y) <= min(acc(net, r, y) for r in runs)
    with pytest.raises(SatError, match="random_start"):
        pgd(net, x, y, eps=eps, steps=3, step_size=eps, random_start=False, restarts=2)


def test_margin_loss_pgd_also_breaks_the_model(trained):
    net, x, y = trained
    x_adv = pgd(net, x, y, eps=EPS, steps=10, step_size=EPS / 4, random_start=False, loss="margin")
    assert acc(net, x_adv, y) < acc(net, x, y) - 0.3
    with pytest.raises(SatError, match="'hinge'"):
        pgd(net, x, y, eps=EPS, steps=1, step_size=EPS, random_start=False, loss="hinge")


def test_trades_attack_increases_kl_more_than_noise(trained):
    net, x, y = trained

    def kl(x_other):
        with torch.no_grad():
            p = F.softmax(net(x), 1)
            return (p * (p.log() - F.log_softmax(net(x_other), 1))).sum(1).mean().item()

    adv = trades_kl_attack(net, x, eps=EPS, steps=10, step_size=EPS / 4, generator=gen(7))
    assert kl(adv) > 10 * kl(uniform_noise(x, EPS, gen(7)))


# --------------------------------------------------------------------------- saliency




def test_saliency_attack_steps_against_the_true_logit_gradient():
    g = gen(8)
    w = torch.randn(3, 3 * 4 * 4, generator=g)
    net = Linear(w, torch.zeros(3))
    x = torch.rand(5, 3, 4, 4, generator=g)
    y = torch.tensor([0, 1, 2, 1, 0])
    expected = torch.clamp(x - EPS * w[y].sign().view(5, 3, 4, 4), 0, 1)
    assert torch.allclose(saliency_attack(net, x, y, EPS), expected)
    smap = w[y].sign().view(5, 3, 4, 4).to(torch.int8)
    assert torch.allclose(saliency_attack_from_map(x, smap, EPS), expected)
    assert net.w.grad is None


def test_saliency_map_attack_broadcasts_and_checks_the_map():
    x, maps = random_batch()
    out = saliency_attack_from_map(x, maps, EPS)
    assert torch.allclose(out, torch.clamp(x - EPS * maps.float().expand(-1, 3, -1, -1), 0, 1))
    with pytest.raises(MismatchError, match=r"\(4, 2, 8, 8\)"):
        saliency_attack_from_map(x, maps.expand(-1, 2, -1, -1), EPS)
    with pytest.raises(MismatchError, match="uint8"):
        saliency_attack_from_map(x, maps.to(torch.uint8), EPS)
    with pytest.raises(SatError, match="saliency"):
        parse_attack("saliency-map")(
            tiny_net().eval(), x, torch.zeros(4, dtype=torch.long), eps=EPS, generator=gen()
        )


# --------------------------------------------------------------------------- parsing


def test_parse_attack_names():
    assert parse_attack("pgd20").steps == 20 and parse_attack("PGD40 ").steps == 40
    assert parse_attack("pgd").steps == 5
    assert parse_attack("trades").steps == 10 and parse_attack("trades7").steps == 7
    assert parse_attack("saliency-map").needs_maps and not parse_attack("saliency").needs_maps
    assert "pgd<N>" in list_attacks() and "autoattack" in list_attacks()
    with pytest.raises(SatError, match="'pgd0'"):
        parse_attack("pgd0")
    with pytest.raises(SatError, match=r"'cw'.*pgd<N>"):
        parse_attack("cw")


# --------------------------------------------------------------------------- AutoAttack


def test_autoattack_breaks_a_weak_model_and_keeps_global_rng():
    pytest.importorskip("torchattacks")
    net = tiny_net(bn=False, gain=10.0).eval()
    x, _ = random_batch()
    with torch.no_grad():
        y = net(x).argmax(1)
    state = torch.get_rng_state()
    x_adv = parse_attack("autoattack")(net, x, y, eps=EPS, generator=gen(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert acc(net, x_adv, y) < 0.5
    assert (x_adv - x).abs().max() <= EPS + 1e-6


def test_autoattack_needs_four_classes():
    pytest.importorskip("torchattacks")
    net = tiny_net(classes=3).eval()
    x, _ = random_batch()
    with pytest.raises(SatError, match="3"):
        parse_attack("autoattack")(
            net, x, torch.zeros(4, dtype=torch.long), eps=EPS, generator=gen()
        )


def test_autoattack_without_torchattacks_tells_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # makes the import fail
    net = tiny_net().eval()
    x, _ = random_batch()
    with pytest.raises(SatError, match=r"pip install 'sat-pipeline\[autoattack\]'"):
        parse_attack("autoattack")(
            net, x, torch.zeros(4, dtype=torch.long), eps=EPS, generator=gen()
        )


# --------------------------------------------------------------------------- evaluate


def test_the_evaluation_loop_matches_a_manual_loop_and_restores_mode(trained):
    """The one loop (used by `sat eval`): batch bi of every attack draws from a generator
    seeded seed * 7919 + bi, so a result does not depend on the other attacks evaluated."""
    net, x, y = trained
    net.train()
    try:
        res = evaluate(net, x, y, attacks={"pgd5": "pgd5"}, budgets={"pgd5": (8.0,)},
                       batch_size=100, seed=3, alignment=False)
        assert net.training
        net.eval()
        manual = sum(
            acc(net, parse_attack("pgd5")(net, x[s : s + 100], y[s : s + 100], eps=EPS,
                                          generator=gen(3 * 7919 + bi)), y[s : s + 100]) * 100
            for bi, s in enumerate(range(0, 400, 100))
        )
        assert res["n"] == 400 and res["clean"] == pytest.approx(acc(net, x, y))
        assert res["attacks"] == {"pgd5": {"8": pytest.approx(manual / 400)}}
        both = evaluate(net, x, y, attacks={"fgsm": "fgsm", "pgd5": "pgd5"},
                        budgets={"fgsm": (8.0,), "pgd5": (8.0,)}, batch_size=100, seed=3,
                        alignment=False)
        assert both["attacks"]["pgd5"] == res["attacks"]["pgd5"]
        # uint8 images and maps are understood too.
        x8 = (x * 255).round().to(torch.uint8)
        maps = torch.ones(400, 1, 8, 8, dtype=torch.int8)
        res8 = evaluate(net, x8, y, attacks={"m": "saliency-map"}, budgets={"m": (0.0,)},
                        maps=maps, alignment=False)
        assert res8["attacks"]["m"]["0"] == pytest.approx(acc(net, x8.float() / 255, y))
        with pytest.raises(SatError, match="no samples"):
            evaluate(net, x[:0], y[:0])
    finally:
        net.eval()


# --------------------------------------------------------------------------- mixed precision


def _trades_like_grads(scaled: bool):
    """Input gradients of TRADES' KL just off x (tiny), in float32 and under float16 autocast
    (CPU autocast stands in for CUDA's here)."""
    from trainer.attacks import primitives as attacks
    from trainer.models import create_model

    torch.manual_seed(0)
    net = create_model("resnet10", 10, width=16).eval()
    x = torch.rand(16, 3, 32, 32)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        p_nat = F.softmax(net(x).float(), dim=1)

    def kl(z):
        return F.kl_div(F.log_softmax(z.float(), dim=1), p_nat, reduction="none").sum(1)

    fp32 = attacks.input_grad(net, x_adv, kl)
    scale = attacks.AMP_GRAD_SCALE
    if not scaled:
        attacks.AMP_GRAD_SCALE = 1.0
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            amp = attacks.input_grad(net, x_adv, kl)
    finally:
        attacks.AMP_GRAD_SCALE = scale
    return fp32, amp


def test_input_gradients_under_autocast_do_not_underflow():
    fp32, amp = _trades_like_grads(scaled=True)
    assert amp.dtype == torch.float32 and torch.isfinite(amp).all()
    assert (amp == 0).float().mean() < 0.001  # unscaled float16 zeroes about 20 % of them
    assert (amp.sign() == fp32.sign()).float().mean() > 0.75
    assert 0.5 < amp.abs().mean() / fp32.abs().mean() < 2  # scaled back (not 4096 times)
    _, unscaled = _trades_like_grads(scaled=False)
    assert (unscaled == 0).float().mean() > 0.05  # what the scaling is for
    assert (unscaled.sign() == fp32.sign()).float().mean() < (amp.sign() == fp32.sign()).float().mean() - 0.1


def test_an_overflowing_scaled_gradient_is_recomputed_in_float32():
    net = Linear(torch.randn(3, 2 * 4 * 4), torch.zeros(3))
    x = torch.rand(4, 2, 4, 4)
    huge = lambda z: 1e4 * z.float().sum(1)  # noqa: E731 - times 4096 overflows float16
    want = input_grad(net, x, huge)
    with torch.autocast("cpu", dtype=torch.float16):
        got = input_grad(net, x, huge)
    assert torch.isfinite(got).all() and torch.allclose(got, want)
