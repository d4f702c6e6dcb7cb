"""The closing table of `n_domains = "auto"`: chosen vs annotated k on the local count slides.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python tests/benchmarks/bench_autok.py --out results/autok \
        mob starmap-mpfc osmfish dlpfc-151510 dlpfc-151673

For every dataset: SemST (``--fusion``, default "none" = w/o LLM, so no embedding cache is needed) with
its own config, seeds 0-4 and ``n_domains = "auto"`` (3-15). Writes ``<out>/<dataset>.json`` as each
dataset finishes (a killed run keeps the finished ones) and prints the markdown table of everything in
``<out>``. The chosen k comes from the embeddings alone; the annotated k is clustered afterwards on the
same embeddings only to report the ARI at it. Nothing is chosen by looking at the ARI.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def run(dataset: str, fusion: str, seeds: list[int], epochs: int | None, out: Path) -> dict:
    from semst.cluster.run import cluster_dataset
    from semst.shared.config import load_cluster_config

    cfg = load_cluster_config(dataset, {"fusion": fusion, "seeds": seeds, "n_domains": "auto", "epochs": epochs})
    t0 = time.perf_counter()
    report = cluster_dataset(cfg, progress=False, write=False)
    wall = time.perf_counter() - t0
    c = report.auto_comparison
    row = {"dataset": dataset, "spots": report.n_spots, "fusion": fusion, "epochs": cfg.epochs, "seeds": seeds,
           "annotated_k": c["annotated_k"], "chosen_k": c["chosen_k"], "range": report.auto.summary()["range"],
           "stability_chosen": c["stability_chosen"], "stability_annotated": c["stability_annotated"],
           "ARI_chosen": c["ARI_chosen"], "ARI_annotated": c["ARI_annotated"],
           "auto_seconds": report.auto.seconds, "train_seconds": sum(r["seconds"] for r in report.per_seed),
           "wall_seconds": wall, "curve": report.auto.summary()}
    (out / f"{dataset}.json").write_text(json.dumps(row, indent=1, default=float))
    return row


def ari(e: dict) -> str:
    return f"{e['mean']:.2f} ± {e['sd']:.2f} (cons. {e['consensus']:.2f})" if e.get("n") else "n/a"


def table(out: Path) -> str:
    lines = ["| dataset | spots | annotated k | chosen k | stability at chosen | stability at annotated | "
             "ARI at chosen k | ARI at annotated k | auto-k (s) | training, 5 seeds (s) | auto cost |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for path in sorted(out.glob("*.json")):
        r = json.loads(path.read_text())
        sa = r["stability_annotated"]
        lines.append(f"| {r['dataset']} | {r['spots']} | {r['annotated_k']} | {r['chosen_k']} | "
                     f"{r['stability_chosen']:.3f} | {'-' if sa is None else f'{sa:.3f}'} | {ari(r['ARI_chosen'])} | "
                     f"{ari(r['ARI_annotated'])} | {r['auto_seconds']:.1f} | {r['train_seconds']:.0f} | "
                     f"{100 * r['auto_seconds'] / r['train_seconds']:.1f} % |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="*")
    p.add_argument("--out", type=Path, default=Path("results/autok"))
    p.add_argument("--fusion", default="none")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--epochs", type=int, default=None, help="default: each dataset's config (100)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    for ds in args.datasets:
        run(ds, args.fusion, seeds, args.epochs, args.out)
        print(table(args.out), flush=True)
    print(table(args.out))


if __name__ == "__main__":
    main()
