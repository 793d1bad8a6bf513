"""The companion papers' training modes, ``gradnorm`` (double backprop) and ``sgt``
(saliency-guided training): closed forms on linear nets, the masked set, λ = 0, AMP, and the
training stage (resume, refused values)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

from pipelines.cli import main as sat_cli
from pipelines.train import TrainConfig, run
from tests.helpers import make_store, one_line_error
from tests.nets import Linear
from tests.runs import assert_same_weights, without_times
from tests.runs import metrics_rows as rows
from trainer.attacks import true_logit_grad
from trainer.loop import LoopConfig
from trainer.perturb import PerturbConfig, create_mode, list_modes
from trainer.regularizers import grad_norm_sq, sgt_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def linear_case(seed=0, b=5, c=3, hw=4, classes=3):
    g = gen(seed)
    w = torch.randn(classes, c * hw * hw, generator=g)
    net = Linear(w, torch.randn(classes, generator=g))
    x = torch.rand(b, c, hw, hw, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    return net, x, y, w


# --------------------------------------------------------------------------- gradnorm


def test_gradnorm_penalty_is_the_hand_computed_input_gradient_norm():
    # CE_i = -log softmax(W x_i + b)_{y_i}, so ∇x CE_i = W^T (p_i - e_{y_i}).
    net, x, y, w = linear_case()
    logits, ce, sq = grad_norm_sq(net, x, y)
    p = torch.softmax(x.flatten(1) @ w.T + net.b.detach(), 1)
    g = (p - F.one_hot(y, 3).float()) @ w
    assert torch.allclose(sq, g.pow(2).sum(1), rtol=1e-5)
    assert torch.allclose(ce, F.cross_entropy(logits, y, reduction="none"))
    mode = create_mode("gradnorm", PerturbConfig(gradnorm_lambda=0.3))
    loss, _ = mode.loss(net, x, y, None, epoch=0.0, generator=gen())
    expect = F.cross_entropy(logits, y) + 0.3 * g.pow(2).sum(1).mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    # The penalty is differentiated through (double backprop): d/dW of λ·mean ||g||² != 0.
    (d_pen,) = torch.autograd.grad(sq.mean(), [net.w])
    assert d_pen.abs().sum() > 0


def test_gradnorm_penalty_under_autocast_matches_float32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 16, 3))
    x = torch.rand(4, 3, 4, 4, generator=gen(1))
    y = torch.tensor([0, 1, 2, 0])
    _, _, ref = grad_norm_sq(net, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = create_mode("gradnorm").loss(net, x, y, None, epoch=0.0, generator=gen())
        _, _, amp = grad_norm_sq(net, x, y)
    assert torch.isfinite(amp).all() and torch.allclose(amp, ref, rtol=0.1)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


# --------------------------------------------------------------------------- sgt


def test_sgt_masks_exactly_the_smallest_gradient_magnitudes():
    # For a linear net the true-logit gradient of sample i is W[y_i]: its k smallest |.|
    # are masked, whatever their sign (the authors' code would take the most negative).
    net, x, y, w = linear_case(seed=1)
    g = true_logit_grad(net, x, y)
    k = int(0.25 * 48)
    _, masked = sgt_mask(x, g, fraction=0.25, fill="uniform", generator=gen())
    ranks = w[y].abs().argsort(1).argsort(1)  # rank of each feature's |gradient|, 0 = smallest
    assert torch.equal(masked.flatten(1), ranks < k)
    assert (masked.flatten(1).sum(1) == k).all()
    most_negative = w[y].argsort(1)[:, :k]  # what sorting signed gradients would pick
    assert not torch.equal(masked.flatten(1).gather(1, most_negative), torch.ones_like(most_negative, dtype=torch.bool))


def test_sgt_fill_values_lie_in_the_image_range_and_leave_the_rest():
    x = torch.rand(6, 3, 5, 5, generator=gen(2)) * 0.5 + 0.2
    grad = torch.randn(6, 3, 5, 5, generator=gen(3))
    xm, masked = sgt_mask(x, grad, fraction=0.6, fill="uniform", generator=gen(4))
    lo = x.flatten(1).amin(1)[:, None, None, None].expand_as(x)
    hi = x.flatten(1).amax(1)[:, None, None, None].expand_as(x)
    assert ((xm >= lo) & (xm <= hi)).all()
    assert torch.equal(xm[~masked], x[~masked]) and not torch.equal(xm[masked], x[masked])
    xc, masked_c = sgt_mask(x, grad, fraction=0.6, fill="channel-mean", generator=gen(4))
    assert torch.equal(masked_c, masked)
    means = x.mean((2, 3), keepdim=True).expand_as(x)
    assert torch.allclose(xc[masked], means[masked])
    # The same generator gives the same draws.
    again, _ = sgt_mask(x, grad, fraction=0.6, fill="uniform", generator=gen(4))
    assert torch.equal(again, xm)


def test_sgt_kl_term_is_zero_when_nothing_is_masked():
    net, x, y, _ = linear_case(seed=3)  # 48 features: int(0.01 * 48) = 0 are masked
    loss, logits = create_mode("sgt", PerturbConfig(sgt_fraction=0.01, sgt_lambda=5.0)).loss(
        net, x, y, None, epoch=0.0, generator=gen())
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-6)
    # With features masked, the KL term is positive and weighted by λ.
    cfg = PerturbConfig(sgt_fraction=0.5, sgt_lambda=5.0)
    loss5, logits = create_mode("sgt", cfg).loss(net, x, y, None, epoch=0.0, generator=gen())
    loss0, _ = create_mode("sgt", replace(cfg, sgt_lambda=0.0)).loss(
        net, x, y, None, epoch=0.0, generator=gen())
    assert loss0.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert loss5.item() > loss0.item()


# --------------------------------------------------------------------------- training stage


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("reg"), n=32, n_val=16, chunk_size=16, maps=())


def config(store, out, mode, epochs=1, **kw) -> TrainConfig:
    loop = LoopConfig(epochs=epochs, robust_val_samples=0, show_progress=False)
    return TrainConfig(store=store.path, out=str(out), mode=mode, width=4, batch_size=16,
                       loop=loop, device="cpu", **kw)


def test_new_modes_are_listed():
    assert {"gradnorm", "sgt"} <= set(list_modes())
    out = CliRunner().invoke(sat_cli, ["list", "modes"]).output.split()
    assert "gradnorm" in out and "sgt" in out


def test_gradnorm_with_lambda_zero_trains_exactly_like_standard(store, tmp_path):
    run(config(store, tmp_path / "std", "standard", epochs=2))
    run(config(store, tmp_path / "gn0", "gradnorm", epochs=2,
               perturb=PerturbConfig(gradnorm_lambda=0.0)))
    assert_same_weights(tmp_path / "std/checkpoints/last.safetensors",
                        tmp_path / "gn0/checkpoints/last.safetensors")
    run(config(store, tmp_path / "gn", "gradnorm", epochs=2))
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "std/checkpoints/last.safetensors",
                            tmp_path / "gn/checkpoints/last.safetensors")


@pytest.mark.parametrize("mode, perturb", [
    ("gradnorm", PerturbConfig(gradnorm_lambda=0.5)),
    ("sgt", PerturbConfig(sgt_fraction=0.3, sgt_fill="channel-mean", sgt_lambda=2.0)),
])
def test_new_modes_resume_exactly(store, tmp_path, mode, perturb):
    full = config(store, tmp_path / "full", mode, epochs=2, perturb=perturb)
    run(full)
    part = tmp_path / "part"
    run(replace(full, out=str(part), loop=replace(full.loop, epochs=1)))
    run(replace(full, out=str(part), resume=True))
    assert without_times(rows(part)) == without_times(rows(tmp_path / "full"))
    assert_same_weights(part / "checkpoints/last.safetensors",
                        tmp_path / "full/checkpoints/last.safetensors")


def cli_train(store, out, *extra):
    args = ["train", "--store", store.path, "--out", str(out), "--width", "4",
            "--batch-size", "16", "--robust-val-samples", "0", "--device", "cpu", "--quiet",
            "--epochs", "1", *map(str, extra)]
    return CliRunner().invoke(sat_cli, args)


@pytest.mark.parametrize("flags, said", [
    (["--mode", "gradnorm", "--gradnorm-lambda", "-1"], "gradnorm_lambda must be a number >= 0, got -1.0"),
    (["--mode", "sgt", "--sgt-fraction", "1.5"], "got 1.5"),
    (["--mode", "sgt", "--sgt-fraction", "0"], "got 0.0"),
    (["--mode", "sgt", "--sgt-lambda", "-3"], "got -3.0"),
    (["--mode", "sgt", "--sgt-fill", "noise"], "unknown sgt_fill 'noise'"),
])
def test_bad_values_are_refused_in_one_line_before_anything_is_written(store, tmp_path, flags, said):
    out = tmp_path / "bad"
    line = one_line_error(cli_train(store, out, *flags))
    assert said in line
    assert not out.exists()


def test_resume_with_another_lambda_or_fraction_is_refused(store, tmp_path):
    out = tmp_path / "run"
    r = cli_train(store, out, "--mode", "sgt", "--sgt-fraction", "0.2")
    assert r.exit_code == 0, r.output
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for flags in (["--sgt-fraction", "0.3"], ["--sgt-lambda", "2"]):
        line = one_line_error(cli_train(store, out, "--mode", "sgt", "--sgt-fraction", "0.2",
                                        "--resume", *flags))
        assert line.startswith("error: --resume: perturb was"), line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("mode", ["gradnorm", "sgt"])
def test_new_modes_train_under_torchrun_with_two_cpu_ranks(store, tmp_path, mode):
    """The double-backprop penalty and sgt's extra forwards run through DDP (gloo): both
    ranks finish the epoch and rank 0 writes a finite checkpoint."""
    import os
    import subprocess
    import sys

    from tests.test_ddp import free_port
    from trainer.checkpoint import load_checkpoint

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "pipelines.cli", "train", "--store", store.path, "--mode", mode,
           "--epochs", "1", "--width", "4", "--batch-size", "8", "--robust-val-samples", "0",
           "--device", "cpu", "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ck = load_checkpoint(out / "checkpoints/last.safetensors")
    assert ck.epoch == 1 and ck.extra["mode"] == mode
    assert all(torch.isfinite(v).all() for v in ck.model_state.values() if v.is_floating_point())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["gradnorm", "sgt"])
def test_new_modes_under_cuda_float16_autocast_match_float32(mode):
    """What the loop does on CUDA: the loss under float16 autocast (inner gradients scaled
    against underflow) is finite and close to float32's, and so are the parameter grads."""
    from trainer.models import create_model

    torch.manual_seed(0)
    net = create_model("resnet10", 4, width=8).cuda().train()
    x = torch.rand(8, 3, 16, 16, device="cuda")
    y = torch.randint(0, 4, (8,), device="cuda")
    m = create_mode(mode, PerturbConfig(gradnorm_lambda=10.0))
    grads, losses = [], []
    for amp in (False, True):
        net.zero_grad(set_to_none=True)
        g = torch.Generator(device="cuda").manual_seed(1)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss, _ = m.loss(net, x, y, None, epoch=0.0, generator=g)
        loss.backward()
        assert torch.isfinite(loss)
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.95
