"""How often ``rag tune query``'s choice loses to ``last_turn`` on the held-out half, over many
seeded splits of a conversational set (MTRAG-public by default): choosing by the mean tuning
score (``--errors 0``) against choosing by the per-turn gain less one standard error (what the
command does), with the mean held-out gain of each.

    .venv/bin/python benchmarks/tune_query_splits.py [--data DIR] [--modes dense hybrid bm25]
        [--seeds 40] [--errors 0 0.5 1]

Every grid point is searched once per mode (``rag.eval.query.grid_hits``, as the command does);
the splits only re-choose. Builds the set's corpus into runs/conversational/idx once (packaged MiniLM).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SHARED, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "mtrag-public")
    ap.add_argument("--modes", nargs="+", default=["dense", "hybrid", "bm25"])
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--errors", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    ap.add_argument("--measure", default="ndcg@10")
    args = ap.parse_args()
    from rag.config import IndexRecipe, pipeline_config
    from rag.eval.datasets import load_dataset
    from rag.eval.fusion import halves
    from rag.eval.query import choose, grid_hits, strategy_grid, turn_scores
    from rag.index import build_index
    from rag.pipeline import RetrievalPipeline
    from rag.retriever import open_retriever

    out = ROOT / "runs" / "conversational" / "idx"
    if not out.exists():
        build_index(IndexRecipe(name="mtrag", corpus=str(args.data / "corpus.jsonl"), out=str(out)), progress=False)
    turns = [it for it in load_dataset(args.data) if it.gold_ids and it.messages]
    grid, rows = strategy_grid(False), []
    for mode in args.modes:
        pipe = RetrievalPipeline(pipeline_config(name="b", kind="retrieval", retrieval={"mode": mode}),
                                 open_retriever(out, mode))
        scores = [turn_scores(turns, h, args.measure) for h in grid_hits(pipe, turns, grid, {}, 100)[1]]
        for errors in args.errors:
            gains = []
            for seed in range(args.seeds):
                tune, held = halves(turns, 0.5, seed, "turns")
                best, _ = choose(grid, scores, tune, errors)
                gains.append(statistics.fmean(scores[best][it.id] - scores[0][it.id] for it in held))
            rows.append([mode, "mean" if errors == 0 else f"mean - {errors:g} SE", sum(g < 0 for g in gains),
                         sum(g == 0 for g in gains), min(gains), statistics.fmean(gains)])
    print(f"{len(turns)} turns with gold passages, {args.seeds} seeded halves, held-out {args.measure} "
          f"gain of the choice over last_turn")
    print(table(rows, ["first stage", "chosen by", "losses", "gain 0", "worst gain", "mean gain"]))


if __name__ == "__main__":
    main()
