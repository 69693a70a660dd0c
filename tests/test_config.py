from pathlib import Path

import pytest

from diffmic.config import Config, ConfigError, DCGConfig, config_from_dict, config_reference, dump_config, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.name))
def test_every_shipped_config_loads_and_round_trips(path):
    config = load_config(path)
    assert config_from_dict(__import__("yaml").safe_load(dump_config(config))) == config


def test_paper_configs_carry_the_papers_settings():
    ham, aptos, pmg = (load_config(f"configs/{name}.yaml") for name in ("ham10000", "aptos2019", "pmg2000"))
    assert (ham.data.num_classes, aptos.data.num_classes, pmg.data.num_classes) == (7, 5, 4)
    assert (ham.eval.steps, aptos.eval.steps, pmg.eval.steps) == (250, 60, 100)
    assert (ham.train.batch_size, aptos.train.batch_size) == (64, 32)
    assert aptos.data.augment.vflip and not ham.data.augment.vflip
    for config in (ham, aptos, pmg):
        assert config.data.image_size == 224
        assert config.model.dcg.k == 6 and config.model.dcg.backbone == "resnet50"
        assert config.model.denoiser.feature_dim == 6144
        assert config.diffusion.mmd_weight == 0.5 and config.diffusion.timesteps == 1000
        assert (config.train.lr, config.train.dcg_lr, config.train.ema_rate) == (1e-3, 2e-4, 0.9999)


def test_dotted_overrides_keep_their_types():
    config = load_config("configs/ham10000.yaml", ["model.dcg.k=4", "train.mixed_precision=fp16",
                                                   "model.dcg.top_t=0.5", "train.ema=false", "train.lr=3e-4"])
    assert config.train.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string; a float key takes it
    assert config.model.dcg.k == 4 and config.model.dcg.top_t == 0.5
    assert config.train.mixed_precision == "fp16" and config.train.ema is False


def test_an_unquoted_no_means_the_choice_no():
    # `--set train.mixed_precision=no` is what users type; YAML 1.1 reads it as false.
    assert load_config("configs/ham10000.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="eval.sampler"):
        load_config("configs/ham10000.yaml", ["eval.sampler=no"])


@pytest.mark.parametrize("override, key", [
    ("model.dcg.k=0", "model.dcg.k"),
    ("model.dcg.k=many", "model.dcg.k"),
    ("model.dcg.crop_channels=red", "model.dcg.crop_channels"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("data.image_size=100", "data.image_size"),
    ("model.variant=c3", "model.variant"),
    ("train.lr=-1", "train.lr"),
    ("model.dcg.kk=3", "model.dcg.kk"),
    ("eval.steps=5000", "eval.steps"),
])
def test_invalid_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config("configs/ham10000.yaml", [override])
    assert error.value.key == key
    assert f"'{key}'" in str(error.value)


def test_k_larger_than_the_number_of_map_cells_is_a_config_error():
    # A 64 px input gives a 2x2 saliency map: at most 4 tiles.
    with pytest.raises(ConfigError, match="only 4 cells") as error:
        config_from_dict({"data": {"image_size": 64}, "model": {"dcg": {"k": 5}}})
    assert error.value.key == "model.dcg.k"


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="'top_t'"):
        DCGConfig(top_t=0.0)


def test_missing_file_is_reported_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match="nothing.yaml does not exist"):
        load_config(tmp_path / "nothing.yaml")


def test_file_errors_name_the_file_and_never_an_empty_key(tmp_path):
    (tmp_path / "list.yaml").write_text("- data\n")
    (tmp_path / "broken.yaml").write_text("data: {dataset: [\n")
    cases = {tmp_path / "nothing.yaml": f"config file {tmp_path / 'nothing.yaml'} does not exist",
             tmp_path / "list.yaml": f"{tmp_path / 'list.yaml'} must hold sections",
             tmp_path / "broken.yaml": f"{tmp_path / 'broken.yaml'} is not valid YAML",
             Path("/dev/null"): "config file /dev/null is not a regular file",
             tmp_path: f"config file {tmp_path} is not a regular file"}
    for path, beginning in cases.items():
        with pytest.raises(ConfigError) as error:
            load_config(path)
        assert str(error.value).startswith(beginning), str(error.value)


def test_reference_lists_every_leaf_key_with_its_default():
    rows = {key: default for key, _, default in config_reference()}
    assert rows["model.dcg.k"] == 6 and rows["train.mixed_precision"] == "bf16"
    assert "model.dcg" not in rows and len(rows) > 40
    assert Config().data.num_classes == rows["data.num_classes"]


def test_readme_configuration_reference_matches_the_code():
    from diffmic.config import reference_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    documented = readme[readme.index(start) + len(start):readme.index(end)].strip()
    assert documented == reference_table(), "README's configuration reference is stale: paste `python -m diffmic.config`"


def test_a_config_extends_its_base_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("data: {image_size: 64, num_classes: 10}\nmodel: {dcg: {k: 2}}\n"
                                      "train: {lr: 0.002, epochs: 5}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {epochs: 7}\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config.data.image_size, config.train.lr, config.train.epochs) == (64, 0.002, 7)
    (tmp_path / "base.yaml").write_text("base: child.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config(tmp_path / "child.yaml")


def test_reference_and_ablation_configs_change_only_their_knobs():
    paper, reference = load_config("configs/ham10000.yaml"), load_config("configs/reference/ham10000.yaml")
    assert (reference.model.dcg.crop_channels, reference.eval.sampler, reference.train.select_split,
            reference.eval.use_ema, reference.train.dcg_warmup_epochs) == ("first", "truncated", "test", False, 15)
    assert reference.model.dcg.backbone == paper.model.dcg.backbone and reference.train.lr == paper.train.lr
    for variant in ("basic", "c1", "c2"):
        ablation = load_config(f"configs/ablations/ham10000-{variant}.yaml")
        assert ablation.model.variant == variant and ablation.train == paper.train
