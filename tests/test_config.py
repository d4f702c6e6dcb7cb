"""Config: one dataclass per stage, from per-dataset TOML, printable and re-loadable."""
import tomllib

import pytest

from semst.shared.config import (ConfigError, available_configs, config_to_toml, load_cluster_config,
                           load_embed_config)


def test_every_dataset_config_loads_for_both_stages():
    names = available_configs()
    assert "dlpfc-151673" in names and "mob" in names
    for name in names:
        cfg = load_cluster_config(name)
        assert cfg.dataset == name and cfg.embed.dataset == name
        assert (cfg.radius is not None) or (cfg.spatial_k is not None)


def test_overrides_replace_single_fields_and_none_means_keep():
    cfg = load_embed_config("mob", {"k_genes": 7, "pooling": None})
    assert cfg.k_genes == 7
    assert cfg.pooling == "mean"


def test_unknown_key_is_refused_with_the_known_ones(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\nradius = 2.0\nepochz = 3\n")
    with pytest.raises(ConfigError, match="unknown key.*epochz"):
        load_cluster_config("whatever", path=bad)


def test_cluster_config_needs_a_spatial_graph_rule(tmp_path):
    path = tmp_path / "nograph.toml"
    path.write_text("[cluster]\nepochs = 3\n")
    with pytest.raises(ConfigError, match="radius or spatial_k"):
        load_cluster_config("whatever", path=path)


@pytest.mark.parametrize("field,value,message", [
    ("fusion", "multiply", "fusion must be one of"),
    ("n_domains", 1, "n_domains must be >= 2"),
    ("epochs", 0, "epochs must be >= 1"),
    ("batch_spots", 1, "batch_spots must be >= 2, got 1"),
    ("decoder_batch", 1, "decoder_batch must be >= 2 spots"),
    ("threads", 0, "threads must be >= 1, got 0"),
    ("minibatch", "sometimes", "minibatch must be \"auto\", \"on\" or \"off\""),
    ("expr_knn", "fast", "expr_knn must be \"auto\", \"exact\" or \"approximate\""),
])
def test_bad_cluster_values_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        load_cluster_config("mob", {field: value})


def test_bad_embed_values_are_refused():
    with pytest.raises(ConfigError, match="pooling must be"):
        load_embed_config("mob", {"pooling": "max"})
    with pytest.raises(ConfigError, match="k_genes must be >= 1"):
        load_embed_config("mob", {"k_genes": 0})


def test_printed_config_loads_back_to_the_same_config(tmp_path):
    cfg = load_cluster_config("mob", {"seeds": [0, 3], "fusion": "concat"}, embed_overrides={"k_genes": 9})
    path = tmp_path / "config.toml"
    path.write_text(config_to_toml(cfg))
    assert tomllib.loads(path.read_text())["cluster"]["seeds"] == [0, 3]
    assert load_cluster_config("mob", path=path) == cfg


def test_printed_embed_config_loads_back_to_the_same_config(tmp_path):
    cfg = load_embed_config("mob", {"pooling": "last", "template": "nonbio"})
    path = tmp_path / "embed.toml"
    path.write_text(config_to_toml(cfg))
    assert load_embed_config("mob", path=path) == cfg
