"""The shared training loop: convergence, exact resume, fingerprints, LR schedule, EMA, validation, saving."""

import dataclasses
import logging

import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset

from noduleflow.models.training import (
    CheckpointMismatch,
    TrainSettings,
    load_model,
    save_model,
    seeded_model,
    train,
)

FINGERPRINT = {"model": "mlp", "data": {"n": 64, "noise": 0.0}}


class Regression(Dataset):
    """y = x @ w + 0.5 for fixed random x and w; items are dicts with a string to exercise collation."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.5

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, item: int) -> dict:
        return {"x": self.x[item], "y": self.y[item], "name": f"item{item}"}


def make_model(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(16, 1))


def mse(model, batch, generator):
    assert batch["name"][0].startswith("item")
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def noisy_mse(model, batch, generator):
    """A loss with its own randomness, drawn from the generator as the contract requires."""
    noise = 0.1 * torch.randn(batch["y"].shape, generator=generator, device=batch["y"].device)
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"] + noise)


SETTINGS = TrainSettings(steps=40, batch_size=16, lr=0.02, warmup_fraction=0.25, checkpoint_every=15, log_every=10)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_loss_falls_and_progress_is_logged(tmp_path, caplog):
    settings = dataclasses.replace(SETTINGS, steps=120, lr=0.03)
    with caplog.at_level(logging.INFO, logger="noduleflow.models.training"):
        result = train(make_model(), mse, Regression(), settings, tmp_path, FINGERPRINT)
    history = result.history
    assert list(history["step"]) == list(range(1, 121))
    assert history["loss"].tail(10).mean() < history["loss"].head(10).mean() / 10
    assert (history["grad_norm"] > 0).all() and history["seconds"].is_monotonic_increasing
    assert history["val_loss"].isna().all()
    lines = [r.getMessage() for r in caplog.records if r.name == "noduleflow.models.training"]
    assert any(line.startswith("step 120/120 loss ") and line.endswith(" steps/s") for line in lines)
    assert sum(line.startswith("step ") for line in lines) == 12
    assert (tmp_path / "checkpoint.pt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary files left behind


def test_bf16_on_cpu_is_an_option_that_still_converges(tmp_path):
    settings = dataclasses.replace(SETTINGS, steps=120, lr=0.03)
    float32 = train(make_model(), mse, Regression(), settings, tmp_path / "float32", FINGERPRINT).history
    bf16 = train(make_model(), mse, Regression(), dataclasses.replace(settings, bf16_cpu=True), tmp_path / "bf16",
                 FINGERPRINT).history
    assert bf16["loss"].tail(10).mean() < bf16["loss"].head(10).mean() / 10
    # the same seeded run in another precision: the first losses agree to bf16's precision, not exactly
    assert bf16["loss"].iloc[0] == pytest.approx(float32["loss"].iloc[0], rel=0.02)
    assert bf16["loss"].iloc[0] != float32["loss"].iloc[0]


def test_killed_run_resumes_to_identical_weights_and_history(tmp_path):
    """A stop after 20 steps, and a crash at step 23 (checkpoint from step 15), both finish like an unbroken run."""
    dataset = Regression()

    def run(folder, loss_fn=noisy_mse, **kwargs):
        model = make_model(dropout=0.2)  # dropout draws on the global RNG, which is reseeded per step
        return model, train(model, loss_fn, dataset, SETTINGS, folder, FINGERPRINT, **kwargs)

    model_a, result_a = run(tmp_path / "a")

    model_b, partial = run(tmp_path / "b", max_steps_this_run=20)
    assert list(partial.history["step"]) == list(range(1, 21))
    model_b, result_b = run(tmp_path / "b")

    calls = {"n": 0}

    def crashing(model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 23:
            raise RuntimeError("simulated kill")
        return noisy_mse(model, batch, generator)

    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path / "c", loss_fn=crashing)
    model_c, result_c = run(tmp_path / "c")

    for model, result in [(model_b, result_b), (model_c, result_c)]:
        assert_same_weights(weights(model), weights(model_a))
        assert_same_weights(weights(result.model), weights(result_a.model))
        pd.testing.assert_frame_equal(result.history.drop(columns="seconds"), result_a.history.drop(columns="seconds"))


def test_changed_fingerprint_is_refused(tmp_path):
    settings = dataclasses.replace(SETTINGS, steps=3)
    train(make_model(), mse, Regression(), settings, tmp_path, FINGERPRINT)
    changed = {"model": "mlp", "data": {"n": 65, "noise": 0.0}}
    with pytest.raises(CheckpointMismatch, match="remove the folder") as caught:
        train(make_model(), mse, Regression(), settings, tmp_path, changed)
    assert "data.n: 64 in the checkpoint, 65 now" in str(caught.value)
    assert "noise" not in str(caught.value) and "'mlp'" not in str(caught.value)  # only differing keys are named
    # the same fingerprint resumes a finished run without training again
    again = train(make_model(), mse, Regression(), settings, tmp_path, dict(FINGERPRINT))
    assert list(again.history["step"]) == [1, 2, 3]


def test_learning_rate_schedule(tmp_path):
    settings = dataclasses.replace(SETTINGS, steps=40, lr=0.01, warmup_fraction=0.25, min_lr_fraction=0.2)
    lr = train(make_model(), mse, Regression(), settings, tmp_path, FINGERPRINT).history.set_index("step")["lr"]
    assert lr[1] == pytest.approx(1e-5)  # 1e-3 * lr
    assert lr[:10].is_monotonic_increasing and lr[11:].is_monotonic_decreasing
    assert lr[11] == pytest.approx(0.01) and lr.max() == pytest.approx(0.01)  # peak once the 10 warm-up steps end
    assert lr[40] == pytest.approx(0.002)  # lr * min_lr_fraction at the last step


def test_result_holds_the_ema_weights(tmp_path):
    model = make_model()
    result = train(model, mse, Regression(), SETTINGS, tmp_path / "ema", FINGERPRINT)
    assert result.model is not model and not result.model.training
    ema, raw = weights(result.model), weights(model)
    assert not any(torch.equal(ema[key], raw[key]) for key in ema)
    stored = torch.load(tmp_path / "ema" / "checkpoint.pt", weights_only=True)
    assert_same_weights(ema, stored["ema"])
    assert_same_weights(raw, stored["model"])

    no_averaging = dataclasses.replace(SETTINGS, ema_decay=0.0)
    model = make_model()
    result = train(model, mse, Regression(), no_averaging, tmp_path / "plain", FINGERPRINT)
    assert_same_weights(weights(result.model), weights(model))


def test_generator_makes_the_loss_randomness_reproducible(tmp_path):
    draws = []

    def recording(model, batch, generator):
        draws.append(torch.rand((), generator=generator).item())
        return noisy_mse(model, batch, generator)

    settings = dataclasses.replace(SETTINGS, steps=10)
    first = train(make_model(), recording, Regression(), settings, tmp_path / "1", FINGERPRINT).history
    first_draws, draws[:] = draws[:], []
    torch.manual_seed(12345)  # the global RNG must not matter
    second = train(make_model(), recording, Regression(), settings, tmp_path / "2", FINGERPRINT).history
    assert draws == first_draws and len(set(draws)) == 10  # same per step, different between steps
    pd.testing.assert_frame_equal(first.drop(columns="seconds"), second.drop(columns="seconds"))
    other_seed = dataclasses.replace(settings, seed=7)
    third = train(make_model(), noisy_mse, Regression(), other_seed, tmp_path / "3", FINGERPRINT).history
    assert not first["loss"].equals(third["loss"])


def test_validation_loss_of_the_ema_model(tmp_path):
    val = Regression(n=10, seed=5)  # batches of 4, 4 and 2: the mean must weight them by size
    settings = dataclasses.replace(SETTINGS, steps=25, batch_size=4)
    result = train(make_model(), mse, Regression(), settings, tmp_path, FINGERPRINT, val_dataset=val, val_every=10)
    computed = result.history.dropna(subset=["val_loss"])
    assert list(computed["step"]) == [10, 20, 25]
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(result.model(val.x), val.y).item()
    assert computed["val_loss"].iloc[-1] == pytest.approx(expected, rel=1e-5)


def test_dataset_smaller_than_a_batch_is_sampled_with_replacement(tmp_path):
    settings = dataclasses.replace(SETTINGS, steps=2, batch_size=8)
    result = train(make_model(), mse, Regression(n=3), settings, tmp_path, FINGERPRINT)
    assert result.history["loss"].notna().all()


def test_save_and_load_model(tmp_path):
    result = train(make_model(), mse, Regression(), dataclasses.replace(SETTINGS, steps=12), tmp_path / "work",
                   FINGERPRINT, val_dataset=Regression(n=8, seed=3), val_every=5)
    hparams = {"hidden": 16, "channels": [4, 1], "name": "mlp"}
    save_model(tmp_path / "out" / "vae.pt", result.model, hparams, result.history)
    state_dict, loaded_hparams = load_model(tmp_path / "out" / "vae.pt")
    assert loaded_hparams == hparams
    assert_same_weights(state_dict, weights(result.model))
    metrics = pd.read_csv(tmp_path / "out" / "vae.metrics.csv")
    assert list(metrics.columns) == ["step", "loss", "lr", "grad_norm", "seconds", "val_loss"]
    assert len(metrics) == 12 and metrics["val_loss"].notna().sum() == 3
    assert (tmp_path / "out" / "vae.loss.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["vae.loss.png", "vae.metrics.csv", "vae.pt"]

    save_model(tmp_path / "bare.pt", result.model, hparams)
    assert [p.name for p in tmp_path.glob("bare*")] == ["bare.pt"]
    with pytest.raises(TypeError):
        save_model(tmp_path / "bad.pt", result.model, {"dtype": torch.float32})


def test_invalid_training_settings_are_refused():
    with pytest.raises(ValueError, match="warmup_fraction"):
        TrainSettings(steps=1, batch_size=1, lr=1.0, warmup_fraction=1.5)


def test_a_seeded_model_starts_from_the_same_weights_whatever_ran_before():
    first = seeded_model(lambda: torch.nn.Linear(8, 8), 3)
    torch.rand(5)  # the global generator moved on
    again = seeded_model(lambda: torch.nn.Linear(8, 8), 3)
    other = seeded_model(lambda: torch.nn.Linear(8, 8), 4)
    assert torch.equal(first.weight, again.weight) and not torch.equal(first.weight, other.weight)
