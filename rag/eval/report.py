"""report.md and PNG plots from an eval summary (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rag.errors import missing_extra

ORDER = ["accuracy", "em", "f1", "match", "match_norm", "recall@1", "recall@5", "recall@20",
         "mrr@10", "ndcg@10"]


def _metric_names(summary: dict[str, Any]) -> list[str]:
    present = {m for p in summary["pipelines"] for m in p["metrics"]}
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_extra("matplotlib", "cpu") from None
    names = _metric_names(summary)
    pipes = summary["pipelines"]
    lines = [f"# Evaluation: {summary['data']}", "",
             f"{summary['questions']} questions; {summary['match_note']}.", "",
             "| pipeline | " + " | ".join(names) + " | s/question |",
             "|---|" + "---|" * (len(names) + 1)]
    for p in pipes:
        cells = []
        for n in names:
            m = p["metrics"].get(n)
            cells.append(f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" if m else "–")
        lines.append(f"| {p['pipeline']} | " + " | ".join(cells) + f" | {p['seconds_per_question']:.3f} |")
    lines.append("")

    answer_metrics = [n for n in names if not n.startswith(("recall", "mrr", "ndcg"))]
    answering = [p for p in pipes if any(n in p["metrics"] for n in answer_metrics)]
    if answer_metrics and answering:
        fig, ax = plt.subplots(figsize=(2.5 + 1.4 * len(answer_metrics), 3.5))
        width = 0.8 / len(answering)
        for i, p in enumerate(answering):
            xs = [j + i * width for j in range(len(answer_metrics))]
            means = [p["metrics"].get(n, {}).get("mean", 0.0) for n in answer_metrics]
            cis = [p["metrics"].get(n, {}).get("ci95", [m, m]) for n, m in zip(answer_metrics, means, strict=True)]
            errs = [[m - ci[0] for m, ci in zip(means, cis, strict=True)],
                    [ci[1] - m for m, ci in zip(means, cis, strict=True)]]
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=p["pipeline"])
        ax.set_xticks([j + width * (len(answering) - 1) / 2 for j in range(len(answer_metrics))], answer_metrics)
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean (95% CI)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "metrics.png", dpi=110)
        plt.close(fig)
        lines += ["![answer metrics](metrics.png)", ""]

    recall = [n for n in names if n.startswith("recall@")]
    if recall:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ks = [int(n.split("@")[1]) for n in recall]
        for p in pipes:
            if any(n in p["metrics"] for n in recall):
                ax.plot(ks, [p["metrics"].get(n, {}).get("mean", float("nan")) for n in recall],
                        marker="o", label=p["pipeline"])
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel("recall@k")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "recall_at_k.png", dpi=110)
        plt.close(fig)
        lines += ["![recall@k](recall_at_k.png)", ""]

    totals = {}
    for p in pipes:
        pred = out / p["pipeline"] / "predictions.jsonl"
        vals = [s["total"] for line in pred.read_text().splitlines() if line
                for s in json.loads(line).get("scores", [])] if pred.exists() else []
        if vals:
            totals[p["pipeline"]] = vals
    if totals:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        for name, vals in totals.items():
            ax.hist(vals, bins=30, alpha=0.6, label=name)
        ax.set_xlabel("Self-RAG candidate score (total)")
        ax.set_ylabel("candidates")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "selfrag_scores.png", dpi=110)
        plt.close(fig)
        lines += ["![Self-RAG scores](selfrag_scores.png)", ""]
    for p in pipes:
        for problem in p.get("check", []):
            lines.append(f"- drift: {problem}")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
