"""Training modes: the SAT perturbation of Eq. 9, its schedule, and every registered mode."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from saliency_cache.errors import MismatchError, SatError
from tests.nets import tiny_net
from trainer.perturb import (
    MODES,
    PerturbConfig,
    create_mode,
    list_modes,
    sat_delta,
    sat_perturb,
    select_maps,
)

EPS0 = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(nn.Module):
    """Wraps a net and records every input it sees and the train/eval mode it ran in."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.inputs, self.training_flags = [], []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        self.training_flags.append(self.net.training)
        return self.net(x)


def batch(b=4, c=3, hw=8, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, hw, hw, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    return x, y


def binary_map(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(torch.int8)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- Eq. 9


def test_sat_delta_statistics_follow_eq9():
    s = binary_map((64, 3, 16, 16), seed=1).float()
    n = s.numel()
    for p in (0.0, 0.25, 0.6, 1.0):
        delta, rnd = sat_delta(s, p_random=p, generator=gen(2))
        frac = rnd.float().mean().item()
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(frac - p) <= 5 * se + 1e-12, (p, frac)
        # Not random: exactly the negative map.
        assert torch.equal(delta[~rnd], -s[~rnd])
        # Random: a sign, +1 and -1 equally often.
        if rnd.any():
            z = delta[rnd]
            assert set(z.unique().tolist()) <= {-1.0, 1.0}
            k = z.numel()
            assert abs((z > 0).float().mean().item() - 0.5) <= 5 * math.sqrt(0.25 / k)


def test_sat_perturb_moves_each_element_by_eps_times_delta():
    x = torch.rand(64, 3, 16, 16, generator=gen(0)) * (1 - 2 * EPS0) + EPS0  # no clipping
    smap = binary_map((64, 3, 16, 16), seed=1)
    p = 0.6
    out = sat_perturb(x, smap, eps=EPS0, p_random=p, generator=gen(3))
    delta = (out - x) / EPS0
    assert torch.allclose(delta.abs(), torch.ones_like(delta), atol=1e-4)
    # An element disagrees with -s only when it was random and z came out as +s: p / 2.
    differs = (delta.round() != -smap.float()).float().mean().item()
    assert abs(differs - p / 2) <= 5 * math.sqrt(p / 2 * (1 - p / 2) / x.numel())
    # The helper and the public function draw the same randomness.
    d, _ = sat_delta(smap.float(), p_random=p, generator=gen(3))
    assert torch.equal(out, torch.clamp(x + EPS0 * d, 0, 1))


def test_sat_perturb_stays_in_ball_and_range_and_is_deterministic():
    x = torch.rand(16, 3, 8, 8, generator=gen(0))
    x[0] = 0.0
    x[1] = 1.0
    smap = binary_map((16, 3, 8, 8), seed=1)
    out = sat_perturb(x, smap, eps=EPS0, p_random=0.3, generator=gen(4))
    assert out.dtype == x.dtype and out.shape == x.shape
    assert (out - x).abs().max() <= EPS0 + 1e-6
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, sat_perturb(x, smap, eps=EPS0, p_random=0.3, generator=gen(4)))
    assert not torch.equal(out, sat_perturb(x, smap, eps=EPS0, p_random=0.3, generator=gen(5)))


def test_one_channel_map_broadcasts_over_channels():
    x = torch.full((8, 3, 8, 8), 0.5)
    smap = binary_map((8, 1, 8, 8), seed=6)
    out = sat_perturb(x, smap, eps=EPS0, p_random=0.0, generator=gen(0))
    expected = 0.5 - EPS0 * smap.float().expand(-1, 3, -1, -1)
    assert torch.allclose(out, expected)


def test_sat_delta_is_the_same_in_int8_and_float():
    """The loop passes int8 maps (the cheap path), tests and multi-sat float ones: the same
    generator gives the same δ and the same branches in either dtype, and in a broadcast
    1-channel map as in its expanded copy."""
    g = torch.Generator().manual_seed(9)
    s = (torch.randint(0, 3, (16, 3, 8, 8), generator=g) - 1).to(torch.int8)
    s1 = (torch.randint(0, 2, (16, 1, 8, 8), generator=g) * 2 - 1).to(torch.int8)
    for smap in (s, s1.expand(16, 3, 8, 8)):
        d8, r8 = sat_delta(smap, p_random=0.45, generator=gen(1))
        df, rf = sat_delta(smap.float().contiguous(), p_random=0.45, generator=gen(1))
        assert d8.dtype == torch.int8 and df.dtype == torch.float32
        assert torch.equal(d8.float(), df) and torch.equal(r8, rf)
    x = torch.rand(16, 3, 8, 8, generator=g)
    assert torch.equal(sat_perturb(x, s1, eps=EPS0, p_random=0.3, generator=gen(2)),
                       sat_perturb(x, s1.float(), eps=EPS0, p_random=0.3, generator=gen(2)))


CUDA = pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_sat_delta_random_bits_are_uniform(device):
    """Four elements share one 64-bit draw: every one of their 16 bits, in every position of
    the word (the top one included), must be a fair coin, or the branch and z would be
    biased for some elements. On CUDA too, whose generator fills the 64-bit range itself."""
    from trainer.perturb import _random_halfwords

    n = 1 << 18
    g = torch.Generator(device=device).manual_seed(3)
    bits = _random_halfwords((n,), g, torch.device(device)).to(torch.int32).cpu() & 0xFFFF
    se = 5 * math.sqrt(0.25 / (n // 4))
    for lane in range(4):
        v = bits[lane::4]
        for b in range(16):
            assert abs(((v >> b) & 1).float().mean().item() - 0.5) <= se, (lane, b)
    # The branch and z of sat_delta on that device: Eq. 9's frequencies, int8 as float.
    s = -torch.ones(n, dtype=torch.int8, device=device)
    d8, rnd = sat_delta(s, p_random=0.3, generator=torch.Generator(device=device).manual_seed(4))
    df, _ = sat_delta(s.float(), p_random=0.3,
                      generator=torch.Generator(device=device).manual_seed(4))
    assert torch.equal(d8.float(), df)
    assert abs(rnd.float().mean().item() - 0.3) <= 5 * math.sqrt(0.21 / n)
    assert torch.equal(d8[~rnd], -s[~rnd])
    assert abs((d8[rnd] > 0).float().mean().item() - 0.5) <= 5 * math.sqrt(0.25 / (0.3 * n))


def test_sat_delta_probability_resolution_and_ends():
    s = -torch.ones(1 << 16, dtype=torch.int8)
    for p in (0.0, 1e-6):  # below half a step of 2^-15: never random
        d, rnd = sat_delta(s, p_random=p, generator=gen(4))
        assert not rnd.any() and torch.equal(d, -s)
    d, rnd = sat_delta(s, p_random=1.0, generator=gen(4))
    assert rnd.all() and set(d.unique().tolist()) == {-1, 1}
    # One step above zero: random with probability 2^-15 (expected 2 of 65,536 elements).
    _, rnd = sat_delta(s, p_random=2.0**-15, generator=gen(5))
    assert 0 <= int(rnd.sum()) <= 12
    with pytest.raises(SatError, match="p_random must be a probability in"):
        sat_delta(s, p_random=1.5, generator=gen(4))


def test_ternary_zeros_are_perturbed_only_when_random():
    g = torch.Generator().manual_seed(7)
    s = (torch.randint(0, 3, (32, 3, 8, 8), generator=g) - 1).float()
    delta, rnd = sat_delta(s, p_random=0.4, generator=gen(8))
    zero = s == 0
    assert (delta[zero & ~rnd] == 0).all()
    assert (delta[zero & rnd].abs() == 1).all()
    assert (zero & rnd).any() and (zero & ~rnd).any()


def test_schedule_alpha_to_the_t():
    cfg = PerturbConfig()
    assert cfg.sat_p_random(0) == 1.0
    assert cfg.sat_p_random(10) == pytest.approx(0.6)
    assert cfg.sat_p_random(20) == pytest.approx(0.36)
    # "alpha^t reaches 0.6 at 5 % of a 10-epoch run": scale = 10 / (0.05 * 10) = 20.
    short = PerturbConfig(sat_time_scale=10 / (0.05 * 10))
    assert short.sat_p_random(0.5) == pytest.approx(0.6)
    with pytest.raises(SatError, match="-1"):
        cfg.sat_p_random(-1)


def test_sat_mode_uses_the_schedule_at_epoch_10():
    net = Recorder(tiny_net())
    x = torch.rand(64, 3, 16, 16, generator=gen(0)) * (1 - 2 * EPS0) + EPS0
    y = torch.randint(0, 3, (64,), generator=gen(1))
    smap = binary_map((64, 3, 16, 16), seed=2)
    create_mode("sat", PerturbConfig()).loss(net, x, y, [smap], epoch=10.0, generator=gen(3))
    (seen,) = net.inputs
    differs = ((seen - x) / EPS0).round() != -smap.float()
    p = 0.6  # alpha^10 with the defaults; differs from -s with probability p / 2
    assert abs(differs.float().mean().item() - p / 2) <= 5 * math.sqrt(0.3 * 0.7 / x.numel())


def test_select_maps_picks_one_map_per_sample():
    x = torch.zeros(64, 3, 4, 4)
    plus = torch.ones(64, 3, 4, 4, dtype=torch.int8)
    minus = -torch.ones(64, 1, 4, 4, dtype=torch.int8)  # 1-channel maps mix with C-channel
    out = select_maps([plus, minus], x, gen(0))
    per_sample = out.flatten(1)
    assert (per_sample == per_sample[:, :1]).all()  # one whole map per sample
    first = (per_sample[:, 0] == 1).float().mean().item()
    assert 0.25 < first < 0.75


def test_multi_sat_mode_uses_a_whole_map_per_sample():
    net = Recorder(tiny_net())
    x = torch.full((64, 3, 8, 8), 0.5)
    y = torch.zeros(64, dtype=torch.long)
    plus = torch.ones(64, 3, 8, 8, dtype=torch.int8)
    minus = -torch.ones(64, 1, 8, 8, dtype=torch.int8)
    mode = create_mode("multi-sat", PerturbConfig())
    mode.loss(net, x, y, [plus, minus], epoch=1000.0, generator=gen(1))  # alpha^t ~ 0
    delta = ((net.inputs[0] - x) / EPS0).round().flatten(1)
    assert (delta == delta[:, :1]).all()
    assert set(delta[:, 0].tolist()) == {-1.0, 1.0}


def test_map_shape_mismatch_is_refused():
    x, y = batch()
    with pytest.raises(MismatchError, match=r"\(4, 3, 4, 4\)"):
        sat_perturb(x, binary_map((4, 3, 4, 4), 0), eps=EPS0, p_random=0.5, generator=gen())
    with pytest.raises(MismatchError, match="uint8"):
        sat_perturb(
            x, torch.ones(4, 3, 8, 8, dtype=torch.uint8), eps=EPS0, p_random=0.5, generator=gen()
        )


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw, bad",
    [
        ({"eps": -0.1}, "-0.1"),
        ({"eps": 8.0}, "8.0"),
        ({"pgd_steps": 0}, "0"),
        ({"pgd_step_size": 0.0}, "0.0"),
        ({"trades_beta": -1.0}, "-1.0"),
        ({"sat_alpha": 1.5}, "1.5"),
        ({"sat_alpha": 0.0}, "0.0"),
        ({"sat_time_scale": 0.0}, "0.0"),
        ({"mix_p": 1.2}, "1.2"),
        ({"uniform_eps": float("nan")}, "nan"),
        ({"trades_steps": 2.5}, "2.5"),
        ({"gradnorm_lambda": -0.5}, "-0.5"),
        ({"sgt_lambda": -2.0}, "-2.0"),
        ({"sgt_fraction": 0.0}, "0.0"),
        ({"sgt_fraction": 1.0}, "1.0"),
        ({"sgt_fraction": 1.5}, "1.5"),
        ({"sgt_fill": "zeros"}, "'zeros'"),
    ],
)
def test_config_rejects_bad_values_quoting_them(kw, bad):
    with pytest.raises(SatError, match=bad):
        PerturbConfig(**kw)


def test_config_round_trips_through_dict():
    cfg = PerturbConfig(eps=4 / 255, mix_p=0.25, sat_time_scale=3.0)
    assert PerturbConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SatError, match="'bogus'"):
        PerturbConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# --------------------------------------------------------------------------- every mode

MAP_MODES = {"sat", "pgd-sat", "trades-sat", "multi-sat"}


def budget(name, cfg):
    """How far any input the model sees may be from the clean batch, per mode."""
    return {
        "standard": 0.0,
        "uniform": cfg.uniform_eps,
        "sat": cfg.sat_eps,
        "multi-sat": cfg.sat_eps,
        "pgd": cfg.eps,
        "trades": cfg.eps,
        "pgd+uniform": cfg.eps + cfg.uniform_eps,
        "trades+uniform": cfg.eps + cfg.uniform_eps,
        "pgd-sat": cfg.eps,
        "trades-sat": cfg.eps,
        "fgsm-rs": cfg.eps,
        "gradnorm": 0.0,
        "sgt": 1.0,  # masked features take any value in the image's range
    }[name]


def maps_for(name, x, seed=0):
    if name not in MAP_MODES:
        return None
    b, c, h, w = x.shape
    maps = [binary_map((b, c, h, w), seed)]
    if name == "multi-sat":
        maps.append(binary_map((b, 1, h, w), seed + 1))
    return maps


def test_map_flags():
    assert {n for n in list_modes() if create_mode(n).needs_maps} == MAP_MODES
    assert {n for n in list_modes() if create_mode(n).multi_map} == {"multi-sat"}
    assert set(list_modes()) == set(MODES.names())
    with pytest.raises(SatError, match="'nope'"):
        create_mode("nope")


@pytest.mark.parametrize("name", list_modes())
def test_mode_step_is_finite_bounded_and_deterministic(name):
    # A larger SAT budget than eps, so that pgd-sat / trades-sat must project.
    cfg = PerturbConfig(sat_eps=12 / 255, mix_p=0.5)
    mode = create_mode(name, cfg)
    assert mode.name == name
    x, y = batch(b=6)
    x[0] = 0.0
    x[1] = 1.0
    maps = maps_for(name, x)
    net = Recorder(tiny_net())
    net.train()
    frozen = net.net[1]
    frozen.eval()  # a deliberately frozen BatchNorm must stay frozen
    loss, logits = mode.loss(net, x, y, maps, epoch=2.0, generator=gen(11))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert logits.shape == (6, 3)
    assert net.net.training and not frozen.training
    # The perturbation was computed without writing any parameter gradient.
    assert all(p.grad is None for p in net.parameters())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    limit = budget(name, cfg)
    for seen in net.inputs:
        assert (seen - x).abs().max() <= limit + 1e-6
        assert seen.min() >= 0 and seen.max() <= 1
    # The same seed gives the same loss (a fresh copy of the model: BN statistics moved).
    net2 = Recorder(tiny_net())
    net2.net[1].eval()
    again, _ = mode.loss(net2, x, y, maps, epoch=2.0, generator=gen(11))
    assert torch.equal(loss.detach(), again.detach())


@pytest.mark.parametrize("name", sorted(MAP_MODES))
def test_map_modes_refuse_to_run_without_maps(name):
    x, y = batch()
    mode = create_mode(name)
    for maps in (None, []):
        with pytest.raises(SatError, match=name):
            mode.loss(tiny_net(), x, y, maps, epoch=0.0, generator=gen())


@pytest.mark.parametrize("name", sorted(MAP_MODES - {"multi-sat"}))
def test_single_map_modes_refuse_two_maps(name):
    x, y = batch()
    two = [binary_map((4, 3, 8, 8), 0), binary_map((4, 3, 8, 8), 1)]
    with pytest.raises(SatError, match="multi-sat"):
        create_mode(name).loss(tiny_net(), x, y, two, epoch=0.0, generator=gen())


@pytest.mark.parametrize(
    "name, sat_calls, other_calls",
    # pgd-sat: SAT = 1 forward; PGD = 5 attack steps + 1.
    # trades-sat: SAT = 2 (natural, adversarial); KL attack = 1 clean + 5 steps, then 2.
    [("pgd-sat", 1, 6), ("trades-sat", 2, 8)],
)
def test_mixed_modes_pick_the_sat_branch_with_probability_mix_p(name, sat_calls, other_calls):
    x, y = batch(b=2, hw=4)
    maps = maps_for(name, x)
    net = Recorder(tiny_net(bn=False))

    def branches(mix_p, seed, n):
        mode = create_mode(name, PerturbConfig(mix_p=mix_p))
        g = gen(seed)
        out = []
        for _ in range(n):
            before = len(net.inputs)
            mode.loss(net, x, y, maps, epoch=1.0, generator=g)
            calls = len(net.inputs) - before
            assert calls in (sat_calls, other_calls)
            out.append(calls == sat_calls)
        return out

    n = 300
    picks = branches(0.3, seed=5, n=n)
    freq = sum(picks) / n
    assert abs(freq - 0.3) <= 4 * math.sqrt(0.3 * 0.7 / n)
    assert picks == branches(0.3, seed=5, n=n)  # deterministic for a seed
    assert not any(branches(0.0, seed=1, n=20))
    assert all(branches(1.0, seed=1, n=20))


def test_attack_generation_runs_in_the_documented_model_mode():
    x, y = batch()
    for name, generation_mode in (("pgd", True), ("trades", False)):
        net = Recorder(tiny_net())
        net.train()
        create_mode(name).loss(net, x, y, None, epoch=0.0, generator=gen())
        flags = net.training_flags
        k = 1 if name == "pgd" else 2  # forwards of the loss itself
        assert all(f == generation_mode for f in flags[:-k]), (name, flags)
        assert all(flags[-k:]), "the loss must be computed in train mode"


def test_trades_loss_is_ce_plus_beta_kl():
    cfg = PerturbConfig(trades_beta=3.0, eps=32 / 255, pgd_step_size=8 / 255)
    x, y = batch(b=5)
    net = Recorder(tiny_net(bn=False))
    with torch.no_grad():
        net.net[0].weight.mul_(20.0)  # a sensitive net, so that the KL term is not negligible
    loss, logits = create_mode("trades", cfg).loss(net, x, y, None, epoch=0.0, generator=gen(2))
    x_adv = net.inputs[-1]
    with torch.no_grad():
        zn, za = net.net(x), net.net(x_adv)
        pn = F.softmax(zn, 1)
        kl = (pn * (pn.log() - F.log_softmax(za, 1))).sum(1).mean()
        expected = F.cross_entropy(zn, y) + 3.0 * kl
    assert kl > 0.01
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
    assert torch.allclose(logits.detach(), zn, atol=1e-6)


def test_fgsm_rs_is_random_start_plus_one_signed_step():
    cfg = PerturbConfig()
    x, y = batch(b=5)
    net = Recorder(tiny_net(bn=False))
    create_mode("fgsm-rs", cfg).loss(net, x, y, None, epoch=0.0, generator=gen(9))
    seen = net.inputs[-1]
    # Recompute Wong et al.'s step by hand with the same random draw.
    u = torch.rand(x.shape, generator=gen(9))
    start = torch.clamp(x + (2 * u - 1) * cfg.eps, 0, 1)
    start.requires_grad_(True)
    F.cross_entropy(net.net(start), y, reduction="sum").backward()
    step = start.detach() + cfg.fgsm_rs_alpha * start.grad.sign()
    expected = torch.clamp(torch.min(torch.max(step, x - cfg.eps), x + cfg.eps), 0, 1)
    assert torch.allclose(seen, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["pgd-sat", "trades-sat"])
def test_sat_branch_of_mixed_modes_is_projected_onto_the_eps_ball(name):
    cfg = PerturbConfig(eps=4 / 255, sat_eps=16 / 255, mix_p=1.0)
    x = torch.full((4, 3, 8, 8), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    net = Recorder(tiny_net(bn=False))
    create_mode(name, cfg).loss(net, x, y, maps_for(name, x), epoch=1000.0, generator=gen(0))
    moved = (net.inputs[-1] - x).abs()
    # Without the projection every element would move by 16/255.
    assert torch.allclose(moved, torch.full_like(moved, 4 / 255), atol=1e-6)


def test_uniform_variants_add_noise_first_then_attack_around_the_noisy_batch():
    from trainer.attacks import pgd, trades_kl_attack, uniform_noise

    cfg = PerturbConfig()
    x, y = batch(b=5)
    base = tiny_net(bn=False)

    net = Recorder(base)
    create_mode("pgd+uniform", cfg).loss(net, x, y, None, epoch=0.0, generator=gen(4))
    g = gen(4)
    xu = uniform_noise(x, cfg.uniform_eps, g)
    expected = pgd(
        base,
        xu,
        y,
        eps=cfg.eps,
        steps=cfg.pgd_steps,
        step_size=cfg.pgd_step_size,
        random_start=True,
        generator=g,
    )
    assert torch.equal(net.inputs[-1], expected)

    net = Recorder(base)
    create_mode("trades+uniform", cfg).loss(net, x, y, None, epoch=0.0, generator=gen(4))
    g = gen(4)
    xu = uniform_noise(x, cfg.uniform_eps, g)
    base.eval()
    x_adv = trades_kl_attack(
        base, xu, eps=cfg.eps, steps=cfg.trades_steps, step_size=cfg.pgd_step_size, generator=g
    )
    base.train()
    natural, adversarial = net.inputs[-2:]
    assert torch.equal(natural, xu) and torch.equal(adversarial, x_adv)
