"""Retrieval measures with graded judgments, computed by ir-measures (trec_eval's own C code
through pytrec-eval-terrier), so each name means what it means in trec_eval, BEIR and pyserini.

Why ir-measures: its default backend *is* trec_eval (the implementation BEIR's ``EvaluateRetrieval``
and pyserini report), and it is a small C extension with no JIT warm-up. ranx was the other
candidate: its numba kernels compile on first use, and it brings pandas, seaborn, ir-datasets and
fastparquet. Measures (``MEASURES``):

- ``ndcg@k``: trec_eval ``ndcg_cut``; gain = the graded relevance, log2 discount.
- ``recall@k``: the *fraction* of relevant documents in the top k (trec_eval ``recall``).
- ``hit@k``: 1 if any relevant document is in the top k (ir-measures ``Success``; the "top-k
  accuracy" of DPR-style QA papers, which they often call recall).
- ``mrr@k``: reciprocal rank of the first relevant document; ``map``: average precision over the
  whole ranking; ``p@k``: precision.

A document counts as relevant when its judgment is > 0. Documents are ranked by their scores as
trec_eval does (ties broken by document id), exactly like BEIR.

>>> qrels = {"q": {"d1": 2, "d2": 1, "d3": 0}}
>>> run = {"q": [("d2", 0.9), ("d1", 0.8), ("d5", 0.7)]}
>>> round(per_query(qrels, run, ["ndcg@10", "recall@1", "hit@1"])["q"]["ndcg@10"], 4)
0.8597
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rag.errors import CorpusError, missing_extra
from rag.eval.records import EvalRecord

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Sequence[tuple[str, float]]]

MEASURES = ("ndcg@10", "recall@1", "recall@5", "recall@20", "recall@100", "hit@1", "hit@5", "hit@20",
            "mrr@10", "map", "p@10")
_NAMES = {"ndcg": "nDCG", "recall": "R", "hit": "Success", "mrr": "RR", "p": "P", "map": "AP"}


def _measure(name: str) -> Any:
    try:
        import ir_measures
    except ImportError:
        raise missing_extra("ir-measures", "cpu") from None
    base, _, k = name.partition("@")
    if base not in _NAMES:
        raise CorpusError(f"unknown retrieval measure {name!r}; use one of {', '.join(MEASURES)}")
    return ir_measures.parse_measure(_NAMES[base] + (f"@{k}" if k else ""))


def per_query(qrels: Qrels, run: Run, measures: Sequence[str] = MEASURES, *,
              ignore_identical_ids: bool = False) -> dict[str, dict[str, float]]:
    """``{query id: {measure: value}}`` for every query that has judgments (a query with an
    empty ranking scores 0). ``ignore_identical_ids`` drops a retrieved document whose id equals
    the query id first (BEIR does so for ArguAna and Quora)."""
    import ir_measures

    parsed = {_measure(m): m for m in measures}
    judged = {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items() if docs}
    ranked: dict[str, dict[str, float]] = {}
    for q in judged:
        hits = run.get(q, ())
        ranked[q] = {d: float(s) for d, s in hits if not (ignore_identical_ids and d == q)}
    out: dict[str, dict[str, float]] = {q: dict.fromkeys(measures, 0.0) for q in judged}
    nonempty = {q: docs for q, docs in ranked.items() if docs}
    for m in ir_measures.iter_calc(list(parsed), judged, nonempty):
        out[m.query_id][parsed[m.measure]] = float(m.value)
    return out


def mean(values: Mapping[str, Mapping[str, float]], measure: str) -> float:
    vals = [v[measure] for v in values.values()]
    return sum(vals) / len(vals) if vals else 0.0


# --- TREC files --------------------------------------------------------------------------------


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """Judgments from a BEIR qrels TSV (``query-id corpus-id score``, header optional) or a TREC
    qrels file (``qid iteration docid relevance``, whitespace-separated)."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"qrels file not found: {p}")
    out: dict[str, dict[str, int]] = {}
    with p.open(encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            row = line.split("\t") if "\t" in line else line.split()
            row = [c.strip() for c in row]
            if not row or not row[0] or (lineno == 1 and row[0] in ("query-id", "query_id", "qid")):
                continue
            if len(row) not in (3, 4):
                raise CorpusError("qrels rows are 'query-id corpus-id score' (BEIR) or 'qid 0 docid rel' "
                                  f"(TREC), got {len(row)} columns", source=str(p), line=lineno)
            qid, doc, rel = (row[0], row[1], row[2]) if len(row) == 3 else (row[0], row[2], row[3])
            try:
                out.setdefault(qid, {})[doc] = int(float(rel))
            except ValueError:
                raise CorpusError(f"relevance {rel!r} is not a number", source=str(p), line=lineno) from None
    return out


def write_run(path: str | Path, run: Run, tag: str) -> None:
    """A TREC run file (``qid Q0 docid rank score tag``), as trec_eval, ranx and pyserini read it."""
    lines = (f"{q} Q0 {d} {rank} {score:.6f} {tag}\n"
             for q, hits in run.items() for rank, (d, score) in enumerate(hits, 1))
    tmp = Path(str(path) + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(lines)
    tmp.replace(path)


def read_run(path: str | Path) -> dict[str, list[tuple[str, float]]]:
    """A TREC run file back, each query's documents in file order."""
    out: dict[str, list[tuple[str, float]]] = {}
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(csv.reader(f, delimiter=" "), 1):
            row = [c for c in line if c]
            if not row:
                continue
            if len(row) != 6:
                raise CorpusError("run rows are 'qid Q0 docid rank score tag'", source=str(path), line=lineno)
            out.setdefault(row[0], []).append((row[2], float(row[4])))
    return out


def run_from_records(records: Iterable[EvalRecord]) -> dict[str, list[tuple[str, float]]]:
    """The ranking of each prediction record (``hits`` with ``hit_scores``)."""
    out = {}
    for r in records:
        scores = r.hit_scores or [1.0 / (i + 1) for i in range(len(r.hits))]
        out[r.id] = list(zip(r.hits, scores, strict=True))
    return out
