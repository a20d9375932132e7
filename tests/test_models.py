"""Models: flow matching, samplers, box weights, the interval embedding, the VAE, and the trained demo models."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, planned_jobs, reconstruction_errors, run_settings, snakemake
from noduleflow.cache.datasets import NodulePatches
from noduleflow.models.flow import VelocityNet, box_weights, flow_matching_loss, flow_start, sample
from noduleflow.models.tasks import load_vae, paired_loss, random_flips, run_hparams
from noduleflow.models.training import TrainSettings, load_model, train
from noduleflow.models.vae import build_vae, vae_loss

NET = {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8,
       "norm_num_groups": 4}
RUN = run_settings(space="raw", formulation="bridge", interval=True, interval_dim=16, box_weight=10.0,
                   box_margin=[2, 2, 1], pretrained=None, net=NET, sigma=0.0)


class _Rotation(torch.nn.Module):
    """An exact velocity field: rotation in the plane of the first two channels (curved paths)."""

    def forward(self, x, t, prior=None, delta_days=None, log_ratio=None):
        return torch.stack([-x[:, 1], x[:, 0]], dim=1)


def test_heun_is_far_more_accurate_than_euler_for_the_same_steps():
    x0 = torch.tensor([[1.0, 0.0]])
    exact = torch.tensor([[np.cos(1.0), np.sin(1.0)]], dtype=torch.float32)
    euler = sample(_Rotation(), x0, 20, "euler")
    heun = sample(_Rotation(), x0, 20, "heun")
    assert (heun - exact).norm() < (euler - exact).norm() / 10
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(_Rotation(), x0, 2, "rk9")


def test_flow_matching_loss_vanishes_for_the_true_velocity_of_straight_paths():
    class Straight(torch.nn.Module):
        def __init__(self, velocity):
            super().__init__()
            self.velocity = velocity

        def forward(self, x, t, prior=None, delta_days=None, log_ratio=None):
            return self.velocity

    generator = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(3, 1, 4, 4, 4), torch.randn(3, 1, 4, 4, 4)
    assert flow_matching_loss(Straight(x1 - x0), x0, x1, generator).item() == pytest.approx(0.0, abs=1e-12)
    assert flow_matching_loss(Straight(torch.zeros_like(x0)), x0, x1, generator).item() > 0.5


def test_flows_start_at_the_prior_the_noise_or_the_noisy_prior():
    prior, noise = torch.full((1, 1, 2, 2, 2), 0.5), torch.randn(1, 1, 2, 2, 2)
    assert torch.equal(flow_start("bridge", prior, noise, 0.3), prior)
    assert torch.equal(flow_start("noise", prior, noise, 0.3), noise)
    assert torch.allclose(flow_start("noisy_prior", prior, noise, 0.3), 0.5 + 0.3 * noise)
    with pytest.raises(ValueError, match="unknown formulation"):
        flow_start("teleport", prior, noise, 0.3)


def test_box_weights_cover_both_boxes_with_their_margin_in_patch_and_latent_grids():
    boxes = (torch.tensor([[4, 5, 6, 7, 2, 2]]), torch.tensor([[10, 11, 10, 11, 3, 3]]))  # (y, x, z)
    weights = box_weights((1, 1, 8, 16, 16), boxes, (1, 1, 0), 5.0, (1.0, 1.0, 1.0))
    assert weights[0, 0, 2, 3:7, 5:9].eq(5).all() and weights[0, 0, 3, 9:13, 9:13].eq(5).all()
    assert weights.eq(5).sum() == 16 + 16 and weights.min() == 1
    latent = box_weights((1, 4, 2, 4, 4), boxes, (0, 0, 0), 5.0, (0.25, 0.25, 0.25))
    assert latent[0, 0, 0, 1, 1] == 5 and latent[0, 0, 0, 0, 0] == 1
    sliced = box_weights((1, 1, 16, 16), boxes, (0, 0, 0), 5.0, (1.0, 1.0, 1.0))
    assert sliced.eq(5).sum() == 8


def _pairs(count=6, seed=0):
    rng = torch.Generator().manual_seed(seed)
    prior = torch.randn(count, 1, 8, 16, 16, generator=rng)
    days = torch.linspace(300, 800, count)
    follow_up = prior * (1 + days / 1000).view(-1, 1, 1, 1, 1)  # the change depends on the interval
    box = torch.tensor([6, 9, 6, 9, 3, 4])
    return [{"prior": prior[i], "follow_up": follow_up[i], "delta_days": days[i], "bbox_a": box, "bbox_b": box}
            for i in range(count)]


@pytest.mark.slow  # trains three small paired runs (about 15-30 s each)
@pytest.mark.parametrize("formulation", ["bridge", "noise", "noisy_prior"])
def test_the_interval_embedding_is_trained(tmp_path, formulation):
    run = dataclasses.replace(RUN, formulation=formulation)
    net = VelocityNet(run_hparams(run, 1))
    before = {k: v.clone() for k, v in net.interval.state_dict().items()}
    settings = TrainSettings(steps=3, batch_size=2, lr=1e-3, ema_decay=0.0, checkpoint_every=3, log_every=3)
    result = train(net, paired_loss(run, (1.0, 1.0, 1.0)), _pairs(), settings, tmp_path, {"run": formulation})
    trained = result.model.train().requires_grad_(True)
    after = {k: v.clone() for k, v in trained.interval.state_dict().items()}
    assert all(not torch.equal(before[k], after[k]) for k in before), "the interval MLP must be optimised"
    # MONAI zero-initialises the cross-attention output, so gradients reach the embedding after the first step
    paired_loss(run, (1.0, 1.0, 1.0))(trained, torch.utils.data.default_collate(_pairs()),
                                      torch.Generator().manual_seed(1)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.interval.parameters())
    x, t = torch.randn(1, 1, 8, 16, 16), torch.tensor([0.5])
    prior = None if formulation == "bridge" else x
    with torch.no_grad():
        early, late = (trained(x, t, prior, torch.tensor([days])) for days in (100.0, 700.0))
    assert not torch.allclose(early, late)


@pytest.mark.slow  # 150 training steps of a 3D VAE
def test_vae_learns_to_reconstruct_better_than_the_mean_patch(tmp_path):
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(np.arange(8), np.arange(16), np.arange(16), indexing="ij")
    images = []
    for _ in range(16):  # blobs of random size and place on a dark background
        centre, radius = rng.uniform([2, 4, 4], [6, 12, 12]), rng.uniform(2, 4)
        blob = ((zz - centre[0]) * 2) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 < radius**2
        images.append({"image": torch.tensor(np.where(blob, 0.6, -0.8)[None], dtype=torch.float32)})
    hparams = {"spatial_dims": 3, "channels": [8, 16], "latent_channels": 2, "num_res_blocks": 1,
               "norm_num_groups": 4}
    settings = TrainSettings(steps=150, batch_size=4, lr=3e-3, checkpoint_every=150, log_every=50)
    result = train(build_vae(hparams), lambda m, b, g: vae_loss(m, b["image"], g, 1e-6), images, settings,
                   tmp_path, {"vae": 1})
    error, baseline = reconstruction_errors(result.model, torch.stack([item["image"] for item in images]))
    assert error < baseline / 2.5, (error, baseline)


# --- the models of the demo run ----------------------------------------------------------------------------

@pytest.mark.slow
def test_the_demo_trains_every_model_and_the_losses_fall(demo_run):
    models = sorted((demo_run / "results" / "models").glob("**/model.pt"))
    assert {p.parent.name for p in models} >= {"vae", "pretrain_2d", "pretrain_3d", "raw3d_bridge",
                                                "latent3d_noise", "slices2d_bridge"}
    for path in models:
        history = pd.read_csv(path.with_name("model.metrics.csv"))
        assert path.with_name("model.loss.png").stat().st_size > 5_000
        assert history["loss"].notna().all() and history["step"].iloc[-1] >= 30
        if path.parent.name.endswith("_bridge"):
            continue  # a bridge starts at "no change" (zero velocity); 30 steps do not move its noisy loss measurably
        assert history["loss"].tail(5).mean() < history["loss"].head(5).mean(), path
        state, hparams = load_model(path)
        assert state and hparams


@pytest.mark.slow
def test_the_demo_vae_reconstructs_patches_better_than_the_mean_patch(demo_run):
    vae = load_vae(demo_run / "results/models/vae/model.pt")
    patches = NodulePatches(demo_run / "results/cache/raw/test")
    error, baseline = reconstruction_errors(vae, torch.stack([patches[i]["image"] for i in range(len(patches))]))
    assert error < baseline / 2, (error, baseline)


def _plan_after(workdir, change):
    """Job counts per rule of a dry-run after `change(config)`; the config is restored afterwards."""
    path = workdir / "config" / "config.yaml"
    original = path.read_text()
    config = yaml.safe_load(original)
    change(config)
    path.write_text(yaml.safe_dump(config))
    try:
        return planned_jobs(snakemake(workdir, "-n"))
    finally:
        path.write_text(original)


@pytest.mark.slow
def test_a_changed_setting_reruns_only_what_depends_on_it(demo_run):
    assert _plan_after(demo_run, lambda config: None) == {}
    plan = _plan_after(demo_run, lambda config: config["models"]["runs"]["slices2d_bridge"].update(box_weight=3.0))
    evaluation = {"evaluate_run": 1, "summarise_run": 1, "evaluation_table": 1}
    assert plan == {"fm_paired": 1, **evaluation}
    plan = _plan_after(demo_run, lambda config: config["models"]["vae"].update(kl_weight=1e-5))
    assert plan == {"train_vae": 1, "encode_latents": 3, "small_boxes_encoded": 3, "fm_pretrain": 1, "fm_paired": 1,
                    "vae_examples": 1, **evaluation}


def test_the_full_config_plans_cleanly_with_gpus_for_training(tmp_path):
    result = snakemake(REPO, "models", "-n", "--configfile", "config/full.yaml")
    plan = result.stdout + result.stderr
    blocks = plan.split("\nrule ")[1:]
    training = [b for b in blocks if b.startswith(("train_vae", "fm_pretrain", "fm_paired"))]
    assert len(training) == 6 and all("gpu=1" in b for b in training)


def test_random_flips_move_prior_follow_up_and_weights_together_and_repeat_with_the_seed():
    prior = torch.arange(16 * 3 * 4 * 4, dtype=torch.float32).reshape(16, 1, 3, 4, 4)
    follow_up, weights = prior * 2.0, prior + 1.0
    flipped = random_flips([prior, follow_up, weights, None], torch.Generator().manual_seed(5))
    assert flipped[3] is None
    torch.testing.assert_close(flipped[1], flipped[0] * 2.0)
    torch.testing.assert_close(flipped[2], flipped[0] + 1.0)
    changed = [not torch.equal(flipped[0][b], prior[b]) for b in range(16)]
    assert 8 <= sum(changed) < 16  # each of 4 choices is a coin flip
    assert sorted(flipped[0][3].flatten().tolist()) == sorted(prior[3].flatten().tolist())
    again = random_flips([prior, follow_up, weights, None], torch.Generator().manual_seed(5))
    torch.testing.assert_close(again[0], flipped[0])


@pytest.mark.slow
def test_a_training_job_killed_mid_way_resumes_from_its_checkpoint_to_the_same_weights(demo_run, tmp_path):
    """SIGKILL of the whole Snakemake process group once the VAE wrote its first checkpoint, then a plain rerun."""
    workdir = tmp_path / "killed"
    shutil.copytree(demo_run, workdir, symlinks=True)
    for path in (workdir / "results" / "models" / "vae").iterdir():
        path.unlink()
    shutil.rmtree(workdir / "results" / "models" / ".work" / "vae")
    target, checkpoint = "results/models/vae/model.pt", workdir / "results/models/.work/vae/checkpoint.pt"
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--cores", "2", target]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not (workdir / target).exists()
    snakemake(workdir, "--unlock")
    snakemake(workdir, "--cores", "2", "--rerun-incomplete", target)
    assert "resuming from step 15/60" in (workdir / "logs/models/train_vae.log").read_text()
    resumed, _ = load_model(workdir / target)
    unbroken, _ = load_model(demo_run / target)
    assert resumed.keys() == unbroken.keys()
    assert all(torch.equal(resumed[name], unbroken[name]) for name in unbroken)
