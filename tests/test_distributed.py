"""Data-parallel training: two workers started like torchrun (Gloo on CPU) train like one process."""

import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset

from noduleflow import distributed
from noduleflow.models.training import TrainSettings, load_model, save_model, train


class _Line(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, item):
        x = torch.linspace(-1, 1, 64)[item].repeat(4) * torch.tensor([1.0, -2.0, 0.5, 3.0])
        return {"x": x, "y": (x.sum() + 0.3).reshape(1)}


def _squared_error(model, batch, generator):
    return (model(batch["x"]) - batch["y"]).pow(2).mean()


def _train_line(*, work_dir, model_path, workers):
    """Train a linear model; every worker runs this, the main one writes the model."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    settings = TrainSettings(steps=12, batch_size=8, lr=0.05, checkpoint_every=5, log_every=5, ema_decay=0.5)
    result = train(model, _squared_error, _Line(), settings, work_dir, {"toy": 1})
    assert distributed.rank_and_size()[1] == workers
    save_model(model_path, result.model, {"toy": 1}, result.history)


@pytest.mark.slow  # starts two training processes that talk over gloo
def test_two_workers_reach_the_weights_of_one_process(tmp_path):
    distributed.run(_train_line, 1, work_dir=tmp_path / "one", model_path=tmp_path / "one.pt", workers=1)
    distributed.run(_train_line, 2, work_dir=tmp_path / "two", model_path=tmp_path / "two.pt", workers=2)
    single, _ = load_model(tmp_path / "one.pt")
    parallel, _ = load_model(tmp_path / "two.pt")
    for name in single:
        torch.testing.assert_close(parallel[name], single[name], rtol=1e-5, atol=1e-6)
    first = pd.read_csv(tmp_path / "one.metrics.csv")
    both = pd.read_csv(tmp_path / "two.metrics.csv")
    assert len(both) == 12 and both["loss"].iloc[-1] < both["loss"].iloc[0]
    torch.testing.assert_close(torch.tensor(both["loss"].values), torch.tensor(first["loss"].values), rtol=1e-5,
                               atol=1e-6)
    assert (tmp_path / "two" / "checkpoint.pt").exists()
