"""The growth head of a paired run: its target, its fit, the flow it conditions, and a portable run with it."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, forecast_config, planned_jobs, run_settings, snakemake
from noduleflow.evaluation.forecast import forecast_batch
from noduleflow.evaluation.predict import Prior, load_portable_run, sample_forecasts
from noduleflow.imaging import Geometry
from noduleflow.models.flow import VelocityNet, sample
from noduleflow.models.growth import GrowthHead, WithLogRatio, log_ratio, sample_level
from noduleflow.models.tasks import paired_loss, run_hparams
from noduleflow.models.training import TrainSettings, save_model, train

NET = {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8,
       "norm_num_groups": 4}
GROWTH = {"channels": [8, 16], "crop": [12, 12, 6], "weight": 1.0, "floor_mm3": 10.0}
SHAPE = (8, 16, 16)  # z, y, x


@pytest.fixture
def one_thread():
    """Tiny networks train many times faster on one thread than on two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def growth_run(formulation="noisy_prior", **overrides):
    return run_settings(**{"space": "raw", "formulation": formulation, "start_noise": 0.5, "interval": True,
                           "interval_dim": 16, "box_weight": 1.0, "box_margin": [2, 2, 1], "pretrained": None,
                           "net": NET, "sigma": 0.0, "growth": GROWTH, **overrides})


def ball(radius: float, value: float = 0.6) -> torch.Tensor:
    """A (1, Z, Y, X) patch in [-1, 1]: a ball of `radius` voxels (z voxels twice as long) at the centre."""
    z, y, x = np.indices(SHAPE)
    inside = ((z - 3.5) * 2) ** 2 + (y - 7.5) ** 2 + (x - 7.5) ** 2 <= radius**2
    return torch.tensor(np.where(inside, value, -0.8)[None], dtype=torch.float32)


def test_the_target_is_the_log_ratio_of_the_measured_volumes_with_a_floor():
    assert log_ratio(100.0, 200.0, 0.0) == pytest.approx(np.log(2.0))
    assert log_ratio(90.0, 0.0, 10.0) == pytest.approx(np.log(10.0 / 100.0))  # a vanished nodule stays finite

    class Pairs:
        pairs = pd.DataFrame({"key_a": ["a0", "b0"], "key_b": ["a1", "b1"]})

        def __len__(self):
            return 2

        def __getitem__(self, item):
            return {"delta_days": torch.tensor(365.0)}

    dataset = WithLogRatio(Pairs(), {"a0": 40.0, "a1": 90.0, "b0": 190.0, "b1": 90.0}, 10.0)
    assert dataset[0]["log_ratio"].item() == pytest.approx(np.log(2.0))
    assert dataset[1]["log_ratio"].item() == pytest.approx(np.log(0.5))
    with pytest.raises(ValueError, match=r"no measured volume for 1 cached nodule\(s\), e.g. \['b1'\]"):
        WithLogRatio(Pairs(), {"a0": 40.0, "a1": 90.0, "b0": 190.0}, 10.0)


def planted(count: int, seed: int) -> list[dict]:
    """Priors whose look sets the growth: bright (solid) balls grow 0.9 per year in log volume, faint ones shrink
    0.3 per year; the measurement adds an error of standard deviation 0.05."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        solid = bool(rng.integers(2))
        days = float(rng.uniform(300.0, 1100.0))
        rate = 0.9 if solid else -0.3
        items.append({"prior": ball(float(rng.uniform(3.0, 5.0)), 0.6 if solid else 0.0),
                      "delta_days": torch.tensor(days),
                      "log_ratio": torch.tensor(rate * days / 365.25 + rng.normal(0.0, 0.05), dtype=torch.float32),
                      "rate": rate})
    return items


def test_the_growth_head_learns_a_planted_relation_between_look_interval_and_growth(tmp_path, one_thread):
    torch.manual_seed(0)
    head = GrowthHead(3, 1, [8, 16], [12, 12, 6])
    items = planted(64, 0)
    settings = TrainSettings(steps=200, batch_size=16, lr=1e-2, ema_decay=0.9, checkpoint_every=200, log_every=100)
    result = train(head, lambda m, b, g: m.nll(b["prior"], b["delta_days"], b["log_ratio"]),
                   [{k: v for k, v in item.items() if k != "rate"} for item in items], settings, tmp_path, {"head": 1})
    losses = result.history["loss"]
    assert losses.tail(20).mean() < losses.head(20).mean() - 2.5, losses.tail(20).mean()

    held_out = planted(32, 1)
    priors = torch.stack([item["prior"] for item in held_out])
    with torch.no_grad():
        mean, std = result.model(priors, torch.full((32,), 730.5))  # two years
    rates = torch.tensor([item["rate"] for item in held_out])
    assert (mean - 2 * rates).abs().median() < 0.1, (mean, rates)
    assert mean[rates > 0].min() > mean[rates < 0].max() + 1.5  # every solid ball is forecast to grow more
    assert std.max() < 0.3  # initially about 1.4
    with torch.no_grad():
        one_year, _ = result.model(priors, torch.full((32,), 365.25))
    torch.testing.assert_close(one_year, mean / 2)  # the growth law: the mean is a rate times the interval

    levels = [sample_level(s, 400) for s in range(400)]
    draws = result.model.draw(priors[:1].expand(400, -1, -1, -1, -1), torch.full((400,), 730.5), levels)
    assert draws.median().item() == pytest.approx(mean[0].item(), abs=0.02 * std[0].item())
    inside = ((draws - mean[0]).abs() < std[0] * math.log(5.0)).float().mean().item()
    assert inside == pytest.approx(0.8, abs=0.005)  # a Laplace distribution's central 80 %
    assert draws.std().item() == pytest.approx(math.sqrt(2.0) * std[0].item(), rel=0.05)
    again = result.model.draw(priors[:1].expand(3, -1, -1, -1, -1), torch.full((3,), 730.5), levels[:3])
    torch.testing.assert_close(again, draws[:3])  # each sample's ratio comes from its level


def test_the_growth_head_forecasts_the_median_growth_of_a_look_not_the_mean(tmp_path, one_thread):
    # three in four nodules of one look stay put, one in four grows sevenfold: the forecast that minimises the
    # absolute error is no growth, while the mean log ratio (0.5) would forecast 65 % growth for all of them
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    items = [{"prior": ball(4.0), "delta_days": torch.tensor(365.25),
              "log_ratio": torch.tensor(2.0 if i % 4 == 0 else rng.normal(0.0, 0.05), dtype=torch.float32)}
             for i in range(64)]
    settings = TrainSettings(steps=300, batch_size=16, lr=1e-2, ema_decay=0.9, checkpoint_every=300, log_every=100)
    result = train(GrowthHead(3, 1, [8, 16], [12, 12, 6]),
                   lambda m, b, g: m.nll(b["prior"], b["delta_days"], b["log_ratio"]), items, settings, tmp_path,
                   {"head": 1})
    with torch.no_grad():
        median, _ = result.model(ball(4.0)[None], torch.tensor([365.25]))
    assert abs(median.item()) < 0.1, median


def scaled_balls(count: int, seed: int) -> list[dict]:
    """Pairs whose follow-up is the prior ball with its volume scaled by exp(log ratio), log ratio in [-1.2, 1.2]."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        radius, ratio = float(rng.uniform(3.0, 4.0)), float(rng.uniform(-1.2, 1.2))
        box = torch.tensor([4, 11, 4, 11, 2, 5])
        items.append({"prior": ball(radius), "follow_up": ball(radius * np.exp(ratio / 3.0)),
                      "delta_days": torch.tensor(float(rng.uniform(300.0, 800.0))), "bbox_a": box, "bbox_b": box,
                      "log_ratio": torch.tensor(ratio, dtype=torch.float32)})
    return items


def disc(radius: float) -> torch.Tensor:
    """A (1, Y, X) slice in [-1, 1]: a disc of `radius` pixels at the centre."""
    y, x = np.indices(SHAPE[1:])
    return torch.tensor(np.where((y - 7.5) ** 2 + (x - 7.5) ** 2 <= radius**2, 0.6, -0.8)[None], dtype=torch.float32)


def disc_area(image: torch.Tensor) -> float:
    """Pixels of disc, counting partial ones by their brightness between background and disc."""
    return float(((image + 0.8) / 1.4).clamp(0.0, 1.0).sum())


def test_the_conditioned_flow_forecasts_grow_with_the_requested_ratio(tmp_path, one_thread):
    """Slices whose follow-up disc has the prior's area times exp(log ratio): forecasts of one prior follow the
    requested ratio (the mechanism is the same for 3D runs, only slower to train)."""
    rng = np.random.default_rng(0)
    items = []
    for _ in range(32):
        radius, ratio = float(rng.uniform(3.0, 4.0)), float(rng.uniform(-1.2, 1.2))
        box = torch.tensor([4, 11, 4, 11, 0, 0])
        items.append({"prior": disc(radius), "follow_up": disc(radius * np.exp(ratio / 2.0)),
                      "delta_days": torch.tensor(400.0), "bbox_a": box, "bbox_b": box,
                      "log_ratio": torch.tensor(ratio, dtype=torch.float32)})
    run = growth_run("bridge", space="slices", interval=False, net={**NET, "attention_levels": [False, False]})
    torch.manual_seed(0)
    settings = TrainSettings(steps=80, batch_size=8, lr=5e-3, ema_decay=0.9, checkpoint_every=80, log_every=40)
    result = train(VelocityNet(run_hparams(run, 1)), paired_loss(run, (1.0, 1.0, 1.0)), items, settings, tmp_path,
                   {"toy": 1})
    prior = disc(3.5)[None].expand(3, -1, -1, -1)
    grown, kept, shrunk = (disc_area(f) for f in sample(result.model, prior, 4, "heun", None, None,
                                                         torch.tensor([1.0, 0.0, -1.0])))
    area = disc_area(prior[0])  # the requested areas: e x area, area, area / e
    assert grown > 2.5 * area and kept == pytest.approx(area, rel=0.15) and shrunk < area / 1.5, (grown, kept, shrunk)


def test_the_flow_and_the_head_both_learn_and_resume_to_the_same_weights(tmp_path, one_thread):
    run = growth_run()
    settings = TrainSettings(steps=4, batch_size=4, lr=1e-3, checkpoint_every=2, log_every=2)

    def trained(folder, **kwargs):
        torch.manual_seed(0)
        net = VelocityNet(run_hparams(run, 1))
        return train(net, paired_loss(run, (1.0, 1.0, 1.0)), scaled_balls(8, 0), settings, folder, {"run": 1},
                     **kwargs)

    model = trained(tmp_path / "whole").model
    whole = model.state_dict()
    trained(tmp_path / "split", max_steps_this_run=2)
    resumed = trained(tmp_path / "split").model.state_dict()
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
    torch.manual_seed(0)
    initial = VelocityNet(run_hparams(run, 1)).state_dict()
    changed = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("unet.class") else "")
               for k in whole if not torch.equal(whole[k], initial[k])}
    assert {"growth_head", "unet.class_embedding"} <= changed  # the head and the ratio embedding are trained
    x, prior = ball(3.5)[None].expand(2, -1, -1, -1, -1), ball(3.0)[None].expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        velocity = model(x, torch.tensor([0.5, 0.5]), prior, torch.tensor([400.0, 400.0]), torch.tensor([1.0, -1.0]))
    assert not torch.allclose(velocity[0], velocity[1])  # the ratio reaches the velocity


def test_a_portable_growth_run_draws_one_ratio_per_sample_deterministically(tmp_path, one_thread):
    run = growth_run()
    hparams = run_hparams(run, 1)
    torch.manual_seed(0)
    net = VelocityNet(hparams)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    patch = {"spacing_mm": [0.9, 0.9, 2.5], "size": [16, 16, 8], "hu_window": [-2000.0, 500.0]}
    save_model(tmp_path / "model.pt", net, {**hparams, "run": run.record()},
               meta={"patch": patch, "sampler": {"method": "heun", "steps": 2}, "seed": 7})
    portable = load_portable_run(tmp_path / "model.pt")
    assert portable.run.growth == run.growth and portable.net.growth_head is not None
    for key, value in net.state_dict().items():
        torch.testing.assert_close(portable.net.state_dict()[key], value, rtol=0, atol=0)

    settings = forecast_config(samples=3, steps=2, seed=7)
    prior = Prior(ball(3.5)[0].numpy(), [4, 11, 4, 11, 2, 5], Geometry((16, 16, 8), (0.9, 0.9, 2.5), (0.0,) * 3,
                                                                       (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)))
    first = sample_forecasts(portable, prior, 400.0, 0, 3, settings)
    np.testing.assert_array_equal(first, sample_forecasts(portable, prior, 400.0, 0, 3, settings))
    assert not np.array_equal(first[0], first[1])

    # the same noise with another drawn ratio gives another forecast: the ratio reaches the samples
    priors = torch.stack([ball(3.5)] * 2)
    days = torch.tensor([400.0, 400.0])
    drawn = forecast_batch(net.eval(), run, priors, days, [5, 5], [0.3, 0.3], settings)
    torch.testing.assert_close(drawn[0], drawn[1])
    fixed = net.growth_head.draw(priors, days, [0.3, 0.3])
    other = sample(net, priors + 0.5 * torch.stack([torch.randn(priors.shape[1:], generator=torch.Generator()
                                                                .manual_seed(5))] * 2),
                   2, "heun", priors, days, fixed + torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(other[0], drawn[0])
    assert not torch.allclose(other[1], drawn[1])


def test_a_growth_run_trains_on_the_measured_volumes_of_its_splits(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["models"]["runs"]["raw3d_bridge"]["growth"] = GROWTH
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "results/models/runs/raw3d_bridge/model.pt",
                       "results/models/runs/slices2d_bridge/model.pt", "-n")
    assert planned_jobs(result)["small_boxes"] == 2  # train and val
    blocks = {block.split("wildcards: run=")[1].split()[0]: block
              for block in (result.stdout + result.stderr).split("rule fm_paired:")[1:]}
    volumes = [f"results/cache/raw/{split}/small_boxes.parquet" for split in ("train", "val")]
    assert all(path in blocks["raw3d_bridge"].split("output:")[0] for path in volumes)
    assert "small_boxes" not in blocks["slices2d_bridge"].split("output:")[0]


def test_a_growth_run_needs_its_measured_volumes_and_samples_several_forecasts():
    from noduleflow.models.tasks import growth_dataset

    with pytest.raises(ValueError, match="needs the measured volumes"):
        growth_dataset(object(), growth_run(), None)
    plain = growth_run(growth=None)
    pairs = object()
    assert growth_dataset(pairs, plain, None) is pairs
    # a bridge's forecasts are random with a head (its ratios are drawn), so it is sampled several times
    assert growth_run("bridge").random_forecasts and not growth_run("bridge", growth=None).random_forecasts
