"""Recipes: named sets of defaults for the per-stage configs.

``recipe = "semst"`` is this repository's behaviour (the dataset files in ``shared/configs`` as they
are). ``recipe = "paper"`` follows the authors' code (github.com/longjiangk/SemST) choice by choice;
every choice is an ordinary config field, so any one of them can be switched alone, and the recipe
only supplies the value of fields the user did not set (command-line options, grid overrides and a
``--config`` file always win; the dataset files in ``shared/configs`` hold the semst recipe's
values and are overridden by the paper recipe).

Line numbers below refer to the authors' repository at commit 4a7e7c4 (files cited as in the repo).
Two things of the authors' code are label use and are never reproduced: the best-epoch-by-ARI
selection (train.py: the `if ari_res > current_dataset_best_ari` block of the epoch loop) and dropping unannotated spots before training
(preprocess/DLPFC_generate_data.py lines 30-31 and the np.delete calls of load_ST_file).
"""
from __future__ import annotations

RECIPES = ("semst", "paper")

# -- paper choices shared by every dataset ----------------------------------------------------------

PAPER_EMBED = {
    # llm_generate_embedding.py line 66 (N_TOP_GENES_LLM = 10) and lines 85-93: argsort of adata.X,
    # the *preprocessed* matrix of the 3000 HVGs written by preprocess/*_generate_data.py, last 10.
    "k_genes": 10,
    "gene_ranking": "scaled",
    "genes_from": "hvg",
}

PAPER_CLUSTER = {
    # train.py line 53: ZINB(pi, theta=disp, ridge_lambda=0.05).loss(features, mean): the target is
    # the preprocessed (scaled) matrix, scale_factor keeps its default 1.0 (utils.py line 125), and
    # utils.py lines 159-160 add ridge_lambda * pi^2 to every entry before the mean.
    "zinb_target": "scaled",
    "zinb_ridge": 0.05,
    # utils.py lines 11-30 (regularization_loss, cosine_similarity): the mean over all N^2 pairs of the
    # neighbour and non-neighbour terms (graph_neg = 1 - graph_nei, preprocess/construction.py lines 31, 56, 92).
    "spatial_loss": "all-pairs",
    # utils.py lines 53, 63 and 82: S = normalize(Z1^T, dim=1) @ normalize(Z2^T, dim=1)^T, i.e. cosine
    # between feature columns (no centring), then (S_ii - 1)^2 mean + S_ij^2 mean.
    "cr_similarity": "cosine",
    # train.py lines 38-41 + utils.py lines 114-121: D^-1 (A + I), row-normalised.
    "gcn_norm": "right",
    # models.py lines 39-43: GraphConvolution weight and bias ~ U(-1/sqrt(out), 1/sqrt(out)).
    "gcn_init": "uniform",
    # models.py: the FSM as published (its last layer initialised like every other Linear).
    "fsm_mode": "paper",
}

# -- per-dataset settings of the authors' config/*.ini (line numbers of those files) -----------------
# Their loss is alpha * zinb + gamma * spatial + beta * correlation reduction (train.py line 58):
# their gamma is our lambda_s, their beta is our gamma.

_DLPFC = {  # config/DLPFC.ini
    "preprocess": {"min_cells": 100,  # preprocess/*_generate_data.py normalize(): filter_genes(min_cells=100)
                   "n_top_genes": 3000,  # DLPFC.ini line 19 (fdim = 3000)
                   "require_top_genes": True},  # train.py: SemST(nfeat=config.fdim, ...) needs fdim genes
    "cluster": {"epochs": 100, "lr": 1e-3, "weight_decay": 5e-4,  # DLPFC.ini lines 2-4
                "expr_k": 14,  # line 5 (k)
                # line 6: radius = 560 full-resolution pixels (self included, ~50 neighbours;
                # construction.py lines 38-62), i.e. ~4.1 spot spacings: unit-free here.
                # construction.py lines 45-49 (the radius query returns the spot itself) + train.py
                # line 40 (+ I): the spot's own weight is 2 in the spatial adjacency.
                "spatial": {"rule": "radius_spacings", "spacings": 4.1, "self_loops": 2},
                "hidden1": 256, "hidden2": 128, "fsm_hidden_ratio": 1.2, "dropout": 0.0,  # lines 7-10
                "zinb_weight": 1.0, "lambda_s": 0.1, "gamma": 0.1},  # lines 11-13 (alpha, gamma, beta)
}

_MBA = {  # config/Mouse_Brain_Anterior.ini
    "preprocess": {"min_cells": 100, "n_top_genes": 3000, "require_top_genes": True},  # line 19
    "cluster": {"epochs": 200, "lr": 1e-3, "weight_decay": 5e-4,  # lines 2-4
                "expr_k": 15,  # line 5
                # line 6 (radius = 15) is the k of construction.py's adaptive threshold
                # (spatial_construct_graph, lines 65-97, called with k = config.radius by preprocess/MBA_generate_data.py)
                "spatial": {"rule": "adaptive", "k": 15},
                "hidden1": 128, "hidden2": 64, "fsm_hidden_ratio": 0.5, "dropout": 0.0,  # lines 7-10
                "zinb_weight": 1.0, "lambda_s": 0.1, "gamma": 0.1},  # lines 11-13
}

_HBC = {  # config/Human_Breast_Cancer.ini
    "preprocess": {"min_cells": 100, "n_top_genes": 2000, "require_top_genes": True},  # line 19 (fdim 2000)
    "cluster": {"epochs": 600, "lr": 1e-4, "weight_decay": 5e-4,  # lines 2-4
                "expr_k": 15,  # line 5
                "spatial": {"rule": "adaptive", "k": 15},  # line 6
                "hidden1": 256, "hidden2": 128, "fsm_hidden_ratio": 0.5, "dropout": 0.0,  # lines 7-10
                "zinb_weight": 1.0, "lambda_s": 0.1, "gamma": 0.1},  # lines 11-13
}

_MVC = {  # config/MVC.ini
    "preprocess": {"min_cells": 100, "n_top_genes": 128, "require_top_genes": True},  # line 19 (fdim 128)
    "cluster": {"epochs": 2000, "lr": 1e-3, "weight_decay": 5e-4,  # lines 2-4
                "expr_k": 5,  # line 5
                # line 6 (radius = 15) is the k of the symmetric kNN graph (construction.py lines
                # 11-35, spatial_construct_graph2, called with k = config.radius by preprocess/MVC_generate_data.py)
                "spatial": {"rule": "knn", "k": 15},
                "hidden1": 128, "hidden2": 64, "fsm_hidden_ratio": 0.5, "dropout": 0.0,  # lines 7-10
                "zinb_weight": 1.0, "lambda_s": 1.0, "gamma": 1.0},  # lines 11-13
}

_EMBRYO = {  # config/Embryo.ini
    "preprocess": {"min_cells": 100, "n_top_genes": 3000, "require_top_genes": True},  # line 19
    "cluster": {"epochs": 500, "lr": 1e-3, "weight_decay": 5e-4,  # lines 2-4
                "expr_k": 15,  # line 5
                "spatial": {"rule": "knn", "k": 15},  # line 6
                "hidden1": 256, "hidden2": 128, "fsm_hidden_ratio": 0.5, "dropout": 0.0,  # lines 7-10
                "zinb_weight": 1.0, "lambda_s": 1.0, "gamma": 1.0},  # lines 11-13
}

# Datasets the authors have no config for (mob, starmap-mpfc, osmfish, seqfish-cortex): their DLPFC
# settings (the paper's main benchmark), with two adaptations that are ours, not the authors':
# preprocessing stays the dataset file's (min_cells = 100 would empty small slides) and the number of
# HVGs is capped at the genes available (STARmap / osmFISH panels have 166 / 33 genes).
_OTHER = {
    "preprocess": {"n_top_genes": 3000, "require_top_genes": False},
    "cluster": dict(_DLPFC["cluster"]),
}

PAPER_DATASETS = {"DLPFC": _DLPFC, "Mouse_Brain_Anterior": _MBA, "Human_Breast_Cancer": _HBC,
                  "MVC": _MVC, "Embryo": _EMBRYO}

def paper_config_name(dataset: str) -> str | None:
    """The authors' config/*.ini a dataset uses (train.py: the config_name choice), or None."""
    if dataset.startswith("dlpfc-"):
        return "DLPFC"
    return {"mba": "Mouse_Brain_Anterior", "hbc": "Human_Breast_Cancer", "mvc": "MVC", "me": "Embryo"}.get(dataset)


def check_recipe(recipe) -> str:
    from semst.shared.config import ConfigError

    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)} "
                          f"(\"paper\" follows the authors' code, \"semst\" is this repository's)")
    return recipe


def recipe_values(recipe: str, dataset: str, section: str) -> dict:
    """The values ``recipe`` gives the fields of ``section`` ("preprocess", "embed", "cluster")."""
    check_recipe(recipe)
    if recipe == "semst":
        return {}
    name = paper_config_name(dataset)
    per_dataset = PAPER_DATASETS[name] if name else _OTHER
    common = {"embed": PAPER_EMBED, "cluster": PAPER_CLUSTER}.get(section, {})
    return {**common, **per_dataset.get(section, {})}


def apply_recipe(recipe: str, dataset: str, section: str, from_files: dict, explicit: dict) -> dict:
    """``from_files`` < the recipe's values < ``explicit`` (what the user set), as one dict.

    The spatial graph is one table (``spatial``): a recipe's rule replaces the files' rule whole,
    and a rule the user sets replaces both (:func:`semst.shared.config.merge_spatial`).
    """
    from semst.shared.config import merge_cluster

    values = dict(recipe_values(recipe, dataset, section))
    if section == "cluster":
        return merge_cluster(merge_cluster(from_files, values), explicit)
    return {**from_files, **values, **explicit}
