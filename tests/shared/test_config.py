"""Config: one dataclass per stage, from per-dataset TOML, printable and re-loadable."""
import tomllib

import pytest

from semst.shared.config import ConfigError, available_configs, config_to_toml, load_cluster_config, load_embed_config


def test_every_dataset_config_loads_for_both_stages():
    names = available_configs()
    assert "dlpfc-151673" in names and "mob" in names
    for name in names:
        cfg = load_cluster_config(name)
        assert cfg.dataset == name and cfg.embed.dataset == name
        assert isinstance(cfg.spatial.get("rule"), str)


def test_overrides_replace_single_fields_and_none_means_keep():
    cfg = load_embed_config("mob", {"k_genes": 7, "pooling": None})
    assert cfg.k_genes == 7
    assert cfg.pooling == "mean"


def test_unknown_key_is_refused_with_the_known_ones(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\nradius = 2.0\nepochz = 3\n")
    with pytest.raises(ConfigError, match="unknown key.*epochz"):
        load_cluster_config("whatever", path=bad)


def test_a_config_without_a_spatial_rule_gets_the_6_nearest_spots_of_default_toml(tmp_path):
    path = tmp_path / "nograph.toml"
    path.write_text("[cluster]\nepochs = 3\n")
    for cfg in (load_cluster_config("whatever", path=path), load_cluster_config("an-unregistered-slide")):
        assert cfg.spatial == {"rule": "knn", "k": 6}


def test_a_cluster_config_with_every_rule_unset_is_refused():
    from semst.shared.config import ClusterConfig, validate_cluster_config

    with pytest.raises(ConfigError, match=r"the spatial graph needs a rule: \[cluster.spatial\] rule"):
        validate_cluster_config(ClusterConfig())


@pytest.mark.parametrize("field,value,message", [
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
    assert tomllib.loads(path.read_text())["cluster"]["clustering"]["seeds"] == [0, 3]
    assert load_cluster_config("mob", path=path) == cfg


def test_printed_embed_config_loads_back_to_the_same_config(tmp_path):
    cfg = load_embed_config("mob", {"pooling": "last", "template": "nonbio"})
    path = tmp_path / "embed.toml"
    path.write_text(config_to_toml(cfg))
    assert load_embed_config("mob", path=path) == cfg


@pytest.mark.parametrize("value, expected", [
    (None, None), (7, 7), ("7", 7), ("auto", "auto:3-15"), ("AUTO", "auto:3-15"), ("auto:4-9", "auto:4-9"),
    ("auto:5-5", "auto:5-5")])
def test_n_domains_is_a_number_or_auto_with_a_range(value, expected):
    assert load_cluster_config("mob", {"n_domains": value}).n_domains == expected


@pytest.mark.parametrize("value, message", [
    (0, "n_domains must be >= 2, got 0"),
    ("0", "n_domains must be >= 2, got 0"),
    ("auto:15-3", "the range is empty, 15 > 3; write the smaller bound first (auto:3-15)"),
    ("auto:1-5", "the smallest number of domains must be >= 2, got 1"),
    ("auto:3", "integer >= 2, \"auto\" or \"auto:LO-HI\""),
    ("seven", "integer >= 2, \"auto\" or \"auto:LO-HI\""),
])
def test_a_malformed_n_domains_is_refused_with_what_to_write(value, message):
    with pytest.raises(ConfigError) as err:
        load_cluster_config("mob", {"n_domains": value})
    assert message in str(err.value)


def test_auto_n_domains_in_a_config_file_loads_back_from_the_printed_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[cluster]\nspatial_k = 6\nn_domains = "auto:4-12"\nrefine = true\n')
    cfg = load_cluster_config("x", path=path)
    assert (cfg.n_domains, cfg.refine) == ("auto:4-12", True)
    (tmp_path / "again.toml").write_text(config_to_toml(cfg))
    assert load_cluster_config("x", path=tmp_path / "again.toml") == cfg


def test_a_spatial_rule_given_as_override_replaces_the_files_rule():
    dlpfc = load_cluster_config("dlpfc-151507")  # the file gives radius_spacings
    assert dlpfc.spatial == {"rule": "radius_spacings", "spacings": 1.9}
    assert load_cluster_config("dlpfc-151507", {"radius": 300.0}).spatial == {"rule": "radius", "radius": 300.0}
    assert load_cluster_config("dlpfc-151673", {"radius_spacings": 2.5}).spatial == {"rule": "radius_spacings",
                                                                                   "spacings": 2.5}


def test_radius_spacings_must_be_positive():
    from semst.cluster.spatial import spatial_rule

    with pytest.raises(ConfigError, match=r"\[cluster.spatial\] spacings must be > 0 \(rule 'radius_spacings'\)"):
        spatial_rule(load_cluster_config("dlpfc-151507", {"radius_spacings": 0.0}))


LOCAL_SLIDES = ["dlpfc-151673", "dlpfc-151510", "mob", "starmap-mpfc", "osmfish", "seqfish-cortex"]


@pytest.mark.parametrize("dataset", LOCAL_SLIDES)
def test_every_local_slide_gets_a_few_neighbours_per_spot_from_its_shipped_config(shared_data_dir, dataset):
    import anndata as ad
    import numpy as np

    from semst.cluster.spatial import spatial_rule

    coords = np.asarray(ad.read_h5ad(shared_data_dir / f"{dataset}.h5ad", backed="r").obsm["spatial"], dtype=float)
    g = spatial_rule(load_cluster_config(dataset)).build(coords)
    assert 4 <= (g.num_edges() - len(coords)) / len(coords) <= 20


def test_a_visium_config_holds_for_the_slide_in_any_unit(shared_data_dir):
    """The DLPFC rule (1.9 spot spacings) on a DLPFC slide in array units and in full-resolution pixels:
    the same ~12 neighbours, where the former radius = 275.0 gave 3451 in array units."""
    import anndata as ad
    import numpy as np

    from semst.cluster.spatial import spatial_rule

    coords = np.asarray(ad.read_h5ad(shared_data_dir / "dlpfc-151510.h5ad", backed="r").obsm["spatial"], dtype=float)
    rule = spatial_rule(load_cluster_config("dlpfc-151507"))
    edges = [rule.build(coords * scale).num_edges() for scale in (1.0, 137.0 / 6.21)]
    assert edges[0] == edges[1] and 10 <= (edges[0] - len(coords)) / len(coords) <= 13


# -- the spatial rule is one unit: default.toml's 6 nearest spots only where nothing sets a rule --------

def test_a_files_own_spatial_rule_replaces_the_default_rule_whole(tmp_path):
    path = tmp_path / "radius.toml"
    path.write_text("[cluster]\nradius = 2.0\n")
    cfg = load_cluster_config("whatever", path=path)
    assert cfg.spatial == {"rule": "radius", "radius": 2.0}  # not default.toml's k = 6 winning over the radius


@pytest.mark.parametrize("name", available_configs())
@pytest.mark.parametrize("recipe", ["semst", "paper"])
def test_every_shipped_config_keeps_exactly_its_own_spatial_rule(name, recipe):
    from semst.shared.config import CONFIG_DIR
    from semst.shared.recipes import recipe_values

    own = tomllib.loads((CONFIG_DIR / f"{name}.toml").read_text()).get("cluster", {}).get("spatial")
    from_recipe = recipe_values(recipe, name, "cluster").get("spatial")
    expected = from_recipe or own or {"rule": "knn", "k": 6}
    assert load_cluster_config(name, {"recipe": recipe}).spatial == expected


def test_an_override_of_the_rule_replaces_the_default_rule_for_an_unregistered_slide():
    cfg = load_cluster_config("an-unregistered-slide", {"radius_spacings": 2.5})
    assert cfg.spatial == {"rule": "radius_spacings", "spacings": 2.5}


# -- every value type-checked from the dataclass type hints ------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"epochs": "five"}, '[cluster] epochs must be an integer, got "five" (str)'),
    ({"epochs": True}, "[cluster] epochs must be an integer, got true (bool)"),
    ({"lr": "fast"}, '[cluster] lr must be a number, got "fast" (str)'),
    ({"radius": "2"}, '[cluster] radius must be a number, got "2" (str)'),  # float | None
    ({"refine": 1}, "[cluster] refine must be true or false, got 1 (int)"),
    ({"fusion": 3}, "[cluster] fusion must be a string, got 3 (int)"),
    ({"seeds": 3}, "[cluster] seeds must be a list of integers, got 3 (int)"),
    ({"seeds": [0, 1.0]}, "[cluster] seeds must be a list of integers, got [0, 1.0] (list)"),
    ({"n_domains": [7]}, "[cluster] n_domains must be an integer or a string, got [7] (list)"),
])
def test_an_override_of_the_wrong_type_is_refused_naming_field_type_and_value(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_cluster_config("mob", overrides)
    assert str(err.value) == message


def test_an_embed_override_of_the_wrong_type_is_refused():
    with pytest.raises(ConfigError, match=r'^\[embed\] k_genes must be an integer, got "5" \(str\)$'):
        load_embed_config("mob", {"k_genes": "5"})


def test_an_integer_is_fine_for_a_number(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[cluster]\nlr = 1\nradius = 2\n[preprocess]\ntarget_sum = 10000\n")
    cfg = load_cluster_config("x", path=path)
    assert (cfg.lr, cfg.spatial["radius"], cfg.preprocess.target_sum) == (1, 2, 10000)


def test_a_nested_section_in_cluster_is_refused_as_an_unknown_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[cluster]\nembed = { k_genes = 5 }\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[cluster\]: embed"):
        load_cluster_config("x", path=path)


def test_a_section_that_is_not_a_table_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("cluster = 5\n")
    with pytest.raises(ConfigError, match=rf"config file {path}: \[cluster\] must be a table of settings, got 5"):
        load_cluster_config("x", path=path)


def test_a_config_file_that_is_not_text_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xff\xfe[cluster]\n")
    with pytest.raises(ConfigError, match=rf"config file {path} cannot be read: 'utf-8' codec"):
        load_embed_config("x", path=path)


@pytest.mark.parametrize("seeds, message", [
    ([-1], "seeds must be >= 0, got -1"),
    ([0, 0], "seeds repeat 0: each seed is one run"),
    ([], "seeds must list at least one seed"),
])
def test_negative_repeated_or_no_seeds_are_refused(seeds, message):
    with pytest.raises(ConfigError, match=message):
        load_cluster_config("mob", {"seeds": seeds})


@pytest.mark.parametrize("field, value, message", [
    ("min_cells", -1, "min_cells must be >= 0, got -1"),
    ("n_top_genes", 0, "n_top_genes must be >= 1, got 0"),
    ("hvg_flavor", "seurat3", "hvg_flavor must be one of 'seurat_v3', "),
    ("target_sum", 0, "target_sum must be > 0 (or unset), got 0"),
])
def test_bad_preprocess_values_are_refused(tmp_path, field, value, message):
    path = tmp_path / "c.toml"
    path.write_text(f"[preprocess]\n{field} = {value!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_embed_config("x", path=path)


# Pinned on the code before the config became sections (issue 21): run-folder names and grid cell
# hashes come from config_identity, so the same settings must keep the same identity.
PINNED_IDENTITIES = [
    ("starmap-mpfc", {}, "4b166e00908b59a8", "film-llm-0830dbde"),
    ("mob", {"recipe": "paper"}, "8e3e8b5416f1f0ce", "film-llm-e7b0771e"),
    ("dlpfc-151673", {}, "08b7edee13c119d3", "film-llm-bd59636c"),
    ("hbc", {"recipe": "paper"}, "7d234cfb15d7f378", "film-llm-3598cbad"),
    ("an-unregistered-slide", {"epochs": 5, "fusion": "concat", "spatial_k": 8, "n_domains": "auto", "seeds": [0, 1]},
     "9b0b0ee2819db8f5", "concat-llm-190b3128"),
    ("mob", {"fsm_mode": "gated", "minibatch": "on", "batch_spots": 300, "radius_spacings": 2.0, "threads": 2},
     "27bea93620dc1c01", "film-llm-6158f257"),
]


@pytest.mark.parametrize("dataset,overrides,identity_hash,run_name", PINNED_IDENTITIES)
def test_config_identity_and_run_name_are_those_of_before_the_sections(dataset, overrides, identity_hash, run_name):
    from semst.cluster.run import default_run_name
    from semst.shared.config import config_identity
    from semst.shared.hashing import json_hash

    cache = {"cache": "/pinned/cache.zarr"}
    cfg = load_cluster_config(dataset, {**overrides, **cache}, embed_overrides=cache)
    assert json_hash(config_identity(cfg), 16) == identity_hash
    assert default_run_name(cfg) == run_name


@pytest.mark.parametrize("change", [{"prefix_reuse": False}, {"backend": "vllm"}, {"backend": "transformers"}])
def test_how_vectors_are_computed_does_not_rename_a_run(change):
    """Settings marked NOT_IN_IDENTITY (prefix_reuse, the backend) change how stage 1 computes, not what."""
    from semst.cluster.run import default_run_name
    from semst.shared.config import config_identity

    cache = {"cache": "/pinned/cache.zarr"}
    default = load_cluster_config("mob", cache, embed_overrides=cache)
    changed = load_cluster_config("mob", cache, embed_overrides={**cache, **change})
    assert all(getattr(changed.embed, k) == v != getattr(default.embed, k) for k, v in change.items())
    assert config_identity(default) == config_identity(changed)
    assert default_run_name(default) == default_run_name(changed)


# -- the sections of [cluster] (issue 21) ---------------------------------------------------------------

def test_a_section_table_and_the_old_flat_key_load_to_the_same_config(tmp_path):
    nested, flat = tmp_path / "nested.toml", tmp_path / "flat.toml"
    nested.write_text("[cluster.train]\nepochs = 5\n[cluster.graph]\nexpr_k = 9\n[cluster.graph.spatial]\n"
                      "rule = \"knn\"\nk = 4\n[cluster.model]\nfsm_mode = \"gated\"\n")
    flat.write_text("[cluster]\nepochs = 5\nexpr_k = 9\nspatial_k = 4\nfsm_mode = \"gated\"\n")
    a, b = load_cluster_config("mob", path=nested), load_cluster_config("mob", path=flat)
    assert a == b
    assert (a.train.epochs, a.graph.expr_k, a.graph.spatial, a.model.fsm_mode) == (5, 9, {"rule": "knn", "k": 4}, "gated")


def test_a_flat_name_reads_and_sets_its_sections_field():
    cfg = load_cluster_config("mob", {"epochs": 7})
    assert cfg.epochs == cfg.train.epochs == 7
    cfg.epochs = 3
    assert cfg.train.epochs == 3 and "epochs" not in vars(cfg)
    assert cfg.replace(lr=0.5).train.lr == 0.5 and cfg.train.lr == 1e-3


def test_a_key_in_the_wrong_section_is_refused_naming_its_section(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[cluster.train]\nexpr_k = 9\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[cluster.train\]: expr_k.*belongs in \[cluster.graph\]"):
        load_cluster_config("mob", path=path)


def test_a_key_set_both_flat_and_in_its_section_is_refused(tmp_path):
    path = tmp_path / "twice.toml"
    path.write_text("[cluster]\nepochs = 5\n[cluster.train]\nepochs = 6\n")
    with pytest.raises(ConfigError, match=r"\[cluster\] and \[cluster.train\] both set epochs"):
        load_cluster_config("mob", path=path)


@pytest.mark.parametrize("text,message", [
    ("[cluster.train]\nlr = \"fast\"\n", r"\[cluster.train\] lr must be a number, got \"fast\" \(str\)"),
    ("[cluster]\nepochs = \"100\"\n", r"\[cluster\] epochs must be an integer, got \"100\" \(str\)"),
    ("[cluster.model]\nfsm_mode = \"fancy\"\n",
     r"fsm_mode must be \"paper\", \"zero-init\" or \"gated\", got \"fancy\""),
    ("[cluster.loss]\nspatial_loss = 3\n", r"spatial_loss must be \"sampled\" or \"all-pairs\", got 3 \(int\)"),
    ("[cluster]\ntrain = 5\n", r"\[cluster\] train must be a table of settings"),
])
def test_a_value_of_the_wrong_type_or_choice_names_the_field_and_the_type_expected(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_cluster_config("mob", path=path)


def test_a_config_built_in_code_is_checked_from_its_hints():
    from semst.shared.config import ClusterConfig, validate_cluster_config

    cfg = ClusterConfig.from_flat(spatial={"rule": "knn", "k": 6}, gcn_norm="left")
    with pytest.raises(ConfigError, match=r"\[cluster.model\] gcn_norm must be \"both\" or \"right\""):
        validate_cluster_config(cfg)


def test_the_dataclasses_are_the_one_source_of_defaults_default_toml_holds_only_the_spatial_rule():
    from semst.shared.config import CONFIG_DIR

    default = tomllib.loads((CONFIG_DIR / "default.toml").read_text())
    assert default == {"cluster": {"spatial": {"rule": "knn", "k": 6}}}


def test_the_networks_defaults_are_the_configs():
    import inspect

    from semst.cluster.network import SemST
    from semst.shared.config import ModelConfig

    params = inspect.signature(SemST).parameters
    for name, value in vars(ModelConfig()).items():
        if name in params:
            assert params[name].default == value, name


def test_an_unknown_fusion_is_a_config_error_naming_the_registered_ones_before_any_work():
    from semst.cluster.seeds import load_slide
    from semst.shared.errors import SemstError

    cfg = load_cluster_config("mob", {"fusion": "multiply"})
    with pytest.raises(ConfigError, match=r"unknown fusion 'multiply'; known: .*film.*cross-attention") as caught:
        load_slide(cfg, adata=object())  # never read: the name is checked first
    assert isinstance(caught.value, SemstError)
