"""Config -> settings (noduleflow.settings): one mechanism for every settings class, config.yaml the only defaults."""

import copy
import dataclasses

import pytest
import yaml
from snakemake.utils import update_config

from conftest import CONFIG, REPO
from noduleflow.cache.patches import PatchSettings
from noduleflow.cache.segmenter import HalfMaximumSegmenter, LearnedSegmenter, build_segmenter
from noduleflow.evaluation.forecast import ForecastSettings, forecast_settings
from noduleflow.evaluation.metrics import SummarySettings
from noduleflow.metadata.synthetic import CohortConfig
from noduleflow.metadata.tables import SeriesFilter
from noduleflow.models.settings import PretrainSettings, RunSettings, VaeSettings
from noduleflow.models.training import TrainSettings
from noduleflow.registration.rigid import QualityThresholds, RegistrationSettings
from noduleflow.settings import SettingsError, from_config, section


@dataclasses.dataclass(frozen=True)
class _Inner:
    factor: float
    flags: tuple[bool, ...]


@dataclasses.dataclass(frozen=True)
class _Outer:
    size: tuple[int, int, int]
    inner: _Inner
    name: str | None
    count: int = 3


def test_lists_become_typed_tuples_nested_sections_dataclasses_and_numbers_their_type():
    built = from_config(_Outer, {"size": [4, 5.0, "6"], "inner": {"factor": "1e-4", "flags": [True, False]},
                                 "name": None})
    assert built == _Outer((4, 5, 6), _Inner(1e-4, (True, False)), None, 3)
    assert [type(v) for v in built.size] == [int, int, int] and isinstance(built.inner.factor, float)
    assert from_config(_Outer, {"size": [1, 2, 3], "inner": {"factor": 2, "flags": []}, "name": "a"},
                       count=7).count == 7  # extra keys (values from elsewhere in the config) join the section


@pytest.mark.parametrize("values, message", [
    ({"size": [1, 2, 3], "inner": {"factor": 1.0, "flags": []}, "name": None, "colour": 1}, r"unknown .*'colour'"),
    ({"size": [1, 2, 3], "inner": {"factor": 1.0, "flags": [], "x": 1}, "name": None}, r"unknown .*'inner.x'"),
    ({"size": [1, 2, 3], "name": None}, r"missing .*'inner'"),
    ({"size": [1, 2], "inner": {"factor": 1.0, "flags": []}, "name": None}, "size must have 3 values"),
    ({"size": [1, 2, 3.5], "inner": {"factor": 1.0, "flags": []}, "name": None}, r"size\[2\] must be a whole"),
    ({"size": [1, 2, 3], "inner": {"factor": 1.0, "flags": [1]}, "name": None}, "must be true or false"),
    ({"size": [1, 2, 3], "inner": {"factor": True, "flags": []}, "name": None}, "inner.factor must be a number"),
    ({"size": [1, 2, 3], "inner": {"factor": 1.0, "flags": []}, "name": 5}, "name must be a string"),
])
def test_sections_that_do_not_fit_are_refused_naming_the_key(values, message):
    with pytest.raises(SettingsError, match=message):
        from_config(_Outer, values)


def test_training_settings_from_a_config_section():
    settings = from_config(TrainSettings, {"steps": 100, "batch_size": 8.0, "lr": "1e-4", "bf16": False})
    assert settings == TrainSettings(steps=100, batch_size=8, lr=1e-4, bf16=False)
    assert isinstance(settings.batch_size, int)
    with pytest.raises(SettingsError, match="unknown TrainSettings"):
        from_config(TrainSettings, {"steps": 1, "batch_size": 1, "lr": 1.0, "learning_rate": 1.0})
    with pytest.raises(SettingsError, match="missing"):
        from_config(TrainSettings, {"steps": 1})


def _settings_of(config: dict) -> list:
    """Every settings object the workflow builds from a config."""
    models = config["models"]
    sigma = {"sigma": models["sigma"]}
    evaluation = config["evaluation"]
    return [
        from_config(CohortConfig, config["synthetic"]),
        from_config(SeriesFilter, config["series_filter"]),
        from_config(RegistrationSettings, config["registration"]["method"], seed=1, threads=1),
        from_config(QualityThresholds, config["registration"]["qc"]),
        from_config(PatchSettings, config["patch"]),
        from_config(PatchSettings, {**config["patch"], **config["volumes"]}),
        build_segmenter(config["segmentation"]),
        from_config(VaeSettings, models["vae"]),
        from_config(VaeSettings, models["vae_volumes"]),
        *[from_config(PretrainSettings, {**section, **sigma}) for section in models["pretrain"].values()],
        *[from_config(RunSettings, {**section, **sigma}) for section in models["runs"].values()],
        forecast_settings(evaluation, models["sampler"], models["seed"]),
        from_config(SummarySettings, section(SummarySettings, evaluation), seed=config["seed"]),
    ]


@pytest.mark.parametrize("name", ["config.yaml", "quality.yaml", "full.yaml"])
def test_every_shipped_config_builds_every_settings_object(name):
    config = copy.deepcopy(CONFIG)  # an overlay, merged as `snakemake --configfile` merges it
    update_config(config, yaml.safe_load((REPO / "config" / name).read_text()))
    built = _settings_of(config)
    assert from_config(PatchSettings, config["patch"]).size == tuple(config["patch"]["size"])
    assert all(dataclasses.is_dataclass(s) for s in built)


def test_a_run_reads_back_from_its_model_file_record():
    run = from_config(RunSettings, {**CONFIG["models"]["runs"]["raw3d_bridge"], "sigma": 0.0})
    assert from_config(RunSettings, run.record()) == run
    assert isinstance(run.training, TrainSettings) and run.box_margin == tuple(
        CONFIG["models"]["runs"]["raw3d_bridge"]["box_margin"])


@pytest.mark.parametrize("cls, key", [(PatchSettings, "patch"), (SummarySettings, "evaluation"),
                                      (ForecastSettings, "evaluation"), (HalfMaximumSegmenter, "segmentation"),
                                      (SeriesFilter, "series_filter"), (RegistrationSettings, "registration.method"),
                                      (QualityThresholds, "registration.qc")])
def test_settings_have_no_defaults_for_keys_the_schema_requires(cls, key):
    """config.yaml is the one source of defaults: a required key left out is an error, never a silent default."""
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    for part in key.split("."):
        schema = schema["properties"][part]
    required = set(schema["required"])
    defaults = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    assert required & {f.name for f in dataclasses.fields(cls)}, "the class reads the section"
    assert not required & defaults


def test_the_cohort_defaults_are_the_demo_cohort_of_the_config():
    """Tests and benchmarks build small cohorts from CohortConfig's defaults: they are config.yaml's demo cohort."""
    assert CohortConfig() == from_config(CohortConfig, CONFIG["synthetic"])


def test_the_segmentation_section_builds_the_segmenter_it_names(tmp_path):
    assert isinstance(build_segmenter(CONFIG["segmentation"]), HalfMaximumSegmenter)
    learned = build_segmenter({**CONFIG["segmentation"], "model": str(tmp_path / "seg.pt2")})
    assert isinstance(learned, LearnedSegmenter)
    assert learned.margin_voxels == tuple(CONFIG["segmentation"]["margin_voxels"])
