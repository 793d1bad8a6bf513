"""Checkpoints: safetensors round-trip of model + optimizer state, atomic writes, clear errors."""

import pytest
import torch

from saliency_cache.errors import SatError
from trainer.checkpoint import Checkpoint, file_sha256, load_checkpoint, save_checkpoint


def _trained_pair(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(torch.randn(5, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def test_round_trip_restores_model_and_optimizer(tmp_path):
    model, opt = _trained_pair()
    path = tmp_path / "ck.safetensors"
    sha = save_checkpoint(path, Checkpoint(
        arch={"name": "x", "num_classes": 3}, model_state=model.state_dict(), epoch=7,
        config={"lr": 0.01}, optim_state=opt.state_dict(), extra={"best": 0.5},
    ))
    assert sha == file_sha256(path)
    ck = load_checkpoint(path)
    assert ck.epoch == 7 and ck.config == {"lr": 0.01} and ck.extra["best"] == 0.5
    model2, opt2 = _trained_pair(seed=1)
    model2.load_state_dict(ck.model_state)
    opt2.load_state_dict(ck.optim_state)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    # One more identical step from both gives identical weights: the Adam moments came back.
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_truncated_checkpoint_is_refused_with_one_line(tmp_path):
    model, _ = _trained_pair()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, Checkpoint(arch={}, model_state=model.state_dict()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SatError, match="truncated or corrupt") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(SatError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SatError, match="not a sat checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, _ = _trained_pair()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, Checkpoint(arch={}, model_state=model.state_dict(), epoch=1))
    before = path.read_bytes()

    import trainer.checkpoint as mod

    def boom(*a, **k):
        raise KeyboardInterrupt  # the process is interrupted mid-write

    monkeypatch.setattr(mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, Checkpoint(arch={}, model_state=model.state_dict(), epoch=2))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]


def test_file_with_rng_tensors_still_loads(tmp_path):
    """Checkpoints once had an (always empty) ``rng`` field written as ``rng.*`` tensors; a
    file holding such tensors loads, with the model and optimizer state it carries."""
    from safetensors.torch import load_file, save_file

    model, opt = _trained_pair()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, Checkpoint(arch={}, model_state=model.state_dict(), epoch=3,
                                     optim_state=opt.state_dict()))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    save_file({**tensors, "rng.cpu": torch.zeros(8, dtype=torch.uint8)}, str(path), metadata=meta)
    ck = load_checkpoint(path)
    assert ck.epoch == 3 and set(ck.model_state) == set(model.state_dict())
    assert not hasattr(ck, "rng")
    assert ck.optim_state["state"].keys() == opt.state_dict()["state"].keys()
