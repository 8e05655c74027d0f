"""A local answer judge: faithfulness and answer relevance from the pipeline's own generator.

The machinery is the prompted critic's (`rag.selfrag.critic`): one short Yes/No question per
aspect in the model's chat format, one generated token, and the probability of the first token
of "Yes" renormalised against "No" (exact logprobs of those two ids):

- ``faithfulness``: is every claim of the answer supported by the passages the answer cites?
- ``answer_relevance``: does the answer address the question?

Both are probabilities in [0, 1], averaged with bootstrap intervals like every metric. Where a
question has gold answers and the pipeline retrieved a passage, the judge is also asked whether
the *gold* answer is supported by the top passage, and its verdict (p > 0.5) is compared with
the known label (a gold answer string occurs in that passage, SQuAD-normalised): the agreement
rate and the threshold-free AUC say how far the judge's numbers can be trusted on this data (a
small model that answers "No" to everything agrees exactly as often as the labels are negative,
and its AUC stays near 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rag.errors import ConfigError
from rag.eval.metrics import normalize_answer
from rag.generation import Generator
from rag.prompts import ChatFormat
from rag.selfrag.scoring import normalised
from rag.types import ChatMessage, GenerationParams, Passage

if TYPE_CHECKING:
    from rag.pipeline import Pipeline

FAITHFUL_Q = ("Passages:\n{passages}\n\nAnswer: {answer}\n\nIs every claim in the answer supported by the "
              "passages? Answer Yes or No.")
RELEVANT_Q = "Question: {question}\n\nAnswer: {answer}\n\nDoes the answer address the question? Answer Yes or No."
METHOD = "Yes/No first-token probability from the pipeline's generator"


def answer_in_passage(answers: Sequence[str], passage: Passage) -> bool:
    """The gold label for the agreement check: a gold answer occurs in the passage."""
    text = normalize_answer(passage.title_text)
    return any(a and a in text for a in map(normalize_answer, answers))


class AnswerJudge:
    """Judges answers with ``generator`` in chat format ``fmt`` (a `rag.prompts.ChatFormat`)."""

    def __init__(self, generator: Generator, fmt: ChatFormat):
        self.generator, self.format = generator, fmt
        self.yes_no = generator.first_token_ids(["Yes", "No"])

    def _prompt(self, content: str) -> str:
        return str(self.format.render([ChatMessage(role="user", content=content)]))

    async def _yes(self, contents: Sequence[str]) -> list[float]:
        if not contents:
            return []
        gens = await self.generator.agenerate([self._prompt(c) for c in contents], GenerationParams(
            max_new_tokens=1, logprob_token_ids=self.yes_no))
        return [normalised(g.logprobs[0] if g.logprobs else {}, self.yes_no)[0] for g in gens]

    async def judge(self, items: Sequence[tuple[str, str, Sequence[Passage]]]) -> list[dict[str, float]]:
        """``(question, answer, cited passages)`` -> ``{"faithfulness", "answer_relevance"}``
        (faithfulness only when the answer cites a passage), all prompts in one batch."""
        faith = [(i, FAITHFUL_Q.format(passages="\n\n".join(p.title_text for p in ps), answer=a))
                 for i, (_, a, ps) in enumerate(items) if ps and a.strip()]
        rel = [(i, RELEVANT_Q.format(question=q, answer=a)) for i, (q, a, _) in enumerate(items) if a.strip()]
        scores = await self._yes([c for _, c in faith] + [c for _, c in rel])
        out: list[dict[str, float]] = [{} for _ in items]
        for (i, _), s in zip(faith, scores[: len(faith)], strict=True):
            out[i]["faithfulness"] = s
        for (i, _), s in zip(rel, scores[len(faith):], strict=True):
            out[i]["answer_relevance"] = s
        return out

    async def check(self, items: Sequence[tuple[str, Sequence[str], Passage]]) -> list[tuple[int, float]]:
        """``(question, gold answers, passage)`` -> (gold label, judged support of the gold
        answer by the passage)."""
        contents = [FAITHFUL_Q.format(passages=p.title_text, answer=golds[0]) for _, golds, p in items]
        scores = await self._yes(contents)
        return [(int(answer_in_passage(golds, p)), s) for (_, golds, p), s in zip(items, scores, strict=True)]


def make_judge(pipeline: Pipeline) -> AnswerJudge:
    """A judge on the pipeline's generator, in the model's chat template when it has one, else
    in the pipeline's prompt format."""
    from rag.config import RetrievalPipelineConfig
    from rag.prompts import get_format

    g, config = pipeline.generator, pipeline.config
    if g is None or isinstance(config, RetrievalPipelineConfig):
        raise ConfigError(f"pipeline {config.name!r} has no generator to judge answers with")
    name = "hf_template" if g.has_chat_template else config.prompt.format
    return AnswerJudge(g, get_format(name, generator=g, extra_control=g.control_strings()))


def agreement(checks: Sequence[tuple[int, float]]) -> float:
    """Share of checks where the judge's verdict (p > 0.5) equals the gold label."""
    return sum((s > 0.5) == bool(label) for label, s in checks) / len(checks) if checks else float("nan")


def auc(checks: Sequence[tuple[int, float]]) -> float:
    """Area under the ROC curve of the judge's probability against the gold labels (threshold
    free: 0.5 = no better than chance, 1 = every supported case above every unsupported one);
    the Mann-Whitney U statistic over n_pos * n_neg. NaN when one label is missing."""
    from scipy.stats import mannwhitneyu

    pos = [s for label, s in checks if label]
    neg = [s for label, s in checks if not label]
    if not pos or not neg:
        return float("nan")
    return float(mannwhitneyu(pos, neg).statistic) / (len(pos) * len(neg))
