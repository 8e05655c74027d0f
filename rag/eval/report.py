"""The eval report: ``report.md`` (GitHub) and ``report.html`` (any browser, self-contained but
for the PNG plots beside it), both from the same blocks; plots with matplotlib (Agg).

Plots: answer metrics and retrieval metrics per pipeline with their 95% intervals, recall@k and
hit@k curves, seconds per question, and the Self-RAG candidate scores. Every text that came from
data (pipeline names, file paths) is escaped in the HTML.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rag.errors import missing_extra
from rag.eval.records import EvalRecord

ORDER = ["accuracy", "em", "f1", "rouge_l", "match", "match_norm", "faithfulness", "answer_relevance",
         "ndcg@10", "recall@1", "recall@5", "recall@20", "recall@100", "hit@1", "hit@5", "hit@20",
         "mrr@10", "map", "p@10"]
RETRIEVAL = ("ndcg@", "recall@", "hit@", "mrr@", "map", "p@")
Block = tuple[str, Any]  # ("h1" | "p" | "table" | "img", content)


def _metric_names(summary: dict[str, Any]) -> list[str]:
    present = {m for p in summary["pipelines"] for m in p["metrics"]}
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_extra("matplotlib", "cpu") from None
    return plt


def _bars(out: Path, file: str, names: Sequence[str], pipes: Sequence[dict[str, Any]]) -> str | None:
    """Grouped bars of each pipeline's mean with its 95% interval; the file name, or None."""
    pipes = [p for p in pipes if any(n in p["metrics"] for n in names)]
    if not names or not pipes:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.5 + 1.2 * len(names), 3.5))
    width = 0.8 / len(pipes)
    for i, p in enumerate(pipes):
        ms = [p["metrics"].get(n, {"mean": 0.0, "ci95": [0.0, 0.0]}) for n in names]
        means = [m["mean"] for m in ms]
        errs = [[m["mean"] - m["ci95"][0] for m in ms], [m["ci95"][1] - m["mean"] for m in ms]]
        ax.bar([j + i * width for j in range(len(names))], means, width, yerr=errs, capsize=3, label=p["pipeline"])
    ax.set_xticks([j + width * (len(pipes) - 1) / 2 for j in range(len(names))], names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean (95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / file, dpi=110)
    plt.close(fig)
    return file


def _curves(out: Path, names: Sequence[str], pipes: Sequence[dict[str, Any]]) -> str | None:
    """recall@k (solid) and hit@k (dashed) against k."""
    families = [(f, [n for n in names if n.startswith(f + "@")]) for f in ("recall", "hit")]
    families = [(f, ns) for f, ns in families if len(ns) > 1]
    if not families:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_ks: set[int] = set()
    for family, ns in families:
        ks = [int(n.split("@")[1]) for n in ns]
        all_ks.update(ks)
        for i, p in enumerate(pipes):
            if any(n in p["metrics"] for n in ns):
                ax.plot(ks, [p["metrics"].get(n, {}).get("mean", float("nan")) for n in ns], marker="o",
                        color=colours[i % len(colours)], linestyle="-" if family == "recall" else "--",
                        label=f"{p['pipeline']} {family}")
    ax.set_xscale("log")
    ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (—), hit@k (- -)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "recall_at_k.png", dpi=110)
    plt.close(fig)
    return "recall_at_k.png"


def _latency(out: Path, records: Mapping[str, Sequence[EvalRecord]]) -> str | None:
    secs = {name: [r.seconds for r in recs] for name, recs in records.items()}
    secs = {k: v for k, v in secs.items() if v}
    if not secs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.5 + 1.0 * len(secs), 3.5))
    ax.boxplot(list(secs.values()))
    ax.set_xticks(range(1, len(secs) + 1), list(secs), fontsize=7, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per question")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    return "latency.png"


def _selfrag_scores(out: Path, records: Mapping[str, Sequence[EvalRecord]]) -> str | None:
    totals = {name: [s["total"] for r in recs for s in r.scores] for name, recs in records.items()}
    totals = {k: v for k, v in totals.items() if v}
    if not totals:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for name, vals in totals.items():
        ax.hist(vals, bins=30, alpha=0.6, label=name)
    ax.set_xlabel("Self-RAG candidate score (total)")
    ax.set_ylabel("candidates")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "selfrag_scores.png", dpi=110)
    plt.close(fig)
    return "selfrag_scores.png"


def comparison_blocks(rows: Sequence[dict[str, Any]], test: str) -> list[Block]:
    """The significance table (`rag.eval.compare.compare` rows)."""
    from rag.eval.compare import ALPHA

    if not rows:
        return []
    return [("p", f"Significance: {test}; * = adjusted p < {ALPHA}."),
            ("table", (["metric", "A", "B", "n", "mean A", "mean B", "A − B", "p", "adjusted p"],
                       [[r["metric"], r["a"], r["b"], str(r["n"]), f"{r['mean_a']:.4f}", f"{r['mean_b']:.4f}",
                         f"{r['diff']:+.4f}" + (" *" if r["significant"] else ""), f"{r['p']:.4f}",
                         f"{r['p_adjusted']:.4f}"] for r in rows]))]


def blocks(out: Path, summary: dict[str, Any], records: Mapping[str, Sequence[EvalRecord]]) -> list[Block]:
    """The report's content, plots written to ``out`` as a side effect; ``records``: each
    pipeline's records by name."""
    names = _metric_names(summary)
    pipes = summary["pipelines"]
    doc: list[Block] = [("h1", f"Evaluation: {summary['data']}"),
                        ("p", f"{summary['questions']} questions; {summary['match_note']}. Intervals are 95% "
                              "bootstrap intervals over questions.")]
    header = ["pipeline", *names, "s/question"]
    rows = [[p["pipeline"], *[(f"{p['metrics'][n]['mean']:.3f} [{p['metrics'][n]['ci95'][0]:.3f}, "
                               f"{p['metrics'][n]['ci95'][1]:.3f}]") if n in p["metrics"] else "–" for n in names],
             f"{p['seconds_per_question']:.3f}"] for p in pipes]
    doc.append(("table", (header, rows)))
    grouped = [(p["pipeline"], g, s) for p in pipes for g, s in (p.get("by_group") or {}).items()]
    if grouped:  # per turn type (conversational sets)
        doc.append(("p", "By question group (a conversational set's turn types):"))
        doc.append(("table", (["pipeline", "group", "n", *names], [
            [name, g, s["n"], *[f"{s['metrics'][n]['mean']:.3f}" if n in s["metrics"] else "–" for n in names]]
            for name, g, s in grouped])))
    for p in pipes:
        if p.get("judge"):
            j = p["judge"]
            doc.append(("p", f"{p['pipeline']}: answer judge ({j['method']}) agrees with the gold label "
                             f"(gold answer in the top passage) on {j['agreement']:.3f} of {j['n']} checks "
                             f"({j['supported']} supported); AUC {j['auc']:.3f} (0.5 = chance)."))
    answer = [n for n in names if not n.startswith(RETRIEVAL)]
    retrieval = [n for n in names if n.startswith(("ndcg@", "mrr@", "map")) or n in ("recall@100",)]
    for file in (_bars(out, "metrics.png", answer, pipes), _bars(out, "retrieval.png", retrieval, pipes),
                 _curves(out, names, pipes), _latency(out, records), _selfrag_scores(out, records)):
        if file:
            doc.append(("img", file))
    doc += comparison_blocks(summary.get("comparisons") or [], summary.get("significance_test", ""))
    drift = [problem for p in pipes for problem in p.get("check", [])]
    if drift:
        doc.append(("p", "Drift from expected scores: " + "; ".join(drift)))
    return doc


def to_markdown(doc: Sequence[Block]) -> str:
    lines: list[str] = []
    for kind, content in doc:
        if kind == "h1":
            lines += [f"# {content}", ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "img":
            lines += [f"![{content}]({content})", ""]
        else:
            header, rows = content
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]
    return "\n".join(lines)


def to_html(doc: Sequence[Block]) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>rag eval report</title><style>"
             "body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right}td:first-child,th:first-child"
             "{text-align:left}img{max-width:100%;margin:.5em 0}</style></head><body>"]
    for kind, content in doc:
        if kind == "h1":
            parts.append(f"<h1>{e(content)}</h1>")
        elif kind == "p":
            parts.append(f"<p>{e(content)}</p>")
        elif kind == "img":
            parts.append(f"<img src='{e(content)}' alt='{e(content)}'>")
        else:
            header, rows = content
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
    return "\n".join(parts + ["</body></html>"]) + "\n"


def write_report(out: Path, summary: dict[str, Any], records: Mapping[str, Sequence[EvalRecord]]) -> Path:
    """Write ``report.md``, ``report.html`` and the plots into ``out``; returns report.md."""
    doc = blocks(out, summary, records)
    (out / "report.html").write_text(to_html(doc), encoding="utf-8")
    path = out / "report.md"
    path.write_text(to_markdown(doc), encoding="utf-8")
    return path
