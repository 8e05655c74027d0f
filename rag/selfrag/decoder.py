"""The Self-RAG decoder: adaptive retrieval, critique-ranked short-form answers, and
segment-level tree search for long-form answers (spec sections 3-4).

Deviations from the reference scripts, each behind a flag that restores the script's
behaviour (`rag.config.SelfRagSettings`; the compat recipes in pipelines/ set them all): the
retrieval ratio uses probabilities, not log-probabilities; the sequence score counts; long-form
paths score by the mean of their segment scores, the best leaf wins, and a segment sees every
passage of its path (the script multiplies, keeps the deepest level and shows only the newest
passage). Not reproducible on purpose: the script mixes up siblings' prefixes. Decoding keeps
special tokens and decides from token ids.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rag.config import SelfRagSettings
from rag.errors import ConfigError
from rag.generation import Generator
from rag.prompts import selfrag_paragraph
from rag.selfrag.critic import Critic, TokenCritic
from rag.selfrag.scoring import (
    CONTINUE,
    Critique,
    Weights,
    combine,
    critique_generation,
    fix_spacing,
    is_label,
    normalise_closed_answer,
    postprocess,
    sequence_score,
    should_retrieve,
    strip_reflection,
    vote,
)
from rag.selfrag.tasks import map_answer
from rag.types import (
    Answer,
    CandidateScores,
    Citation,
    Generation,
    GenerationParams,
    Hit,
    Passage,
    RetrievalDecision,
    Timings,
    Trace,
    TreeNode,
    Usage,
)

SearchFn = Callable[[Sequence[str], int], Awaitable[list[list[Hit]]]]


def _weights(s: SelfRagSettings) -> Weights:
    return Weights(rel=s.w_rel, sup=s.w_sup, use=s.w_use, seq=s.use_seq)


def _scores(p: Passage | None, text: str, c: Critique, rank: int | None = None, w_ret: float = 0.0) -> CandidateScores:
    """A candidate's scores; ``rank`` (short form) adds the retrieval prior ``w_ret / rank``."""
    s_ret = 1.0 / rank if rank else 0.0
    return CandidateScores(passage_id=p.id if p else None, text=text, s_rel=c.s_rel, s_sup=c.s_sup,
                           s_use=c.s_use, seq=c.seq, total=c.total + w_ret * s_ret, s_ret=s_ret)


class SelfRagDecoder:
    """Runs Self-RAG for batches of questions.

    Args:
        generator: any `Generator`.
        critic: `TokenCritic` (Self-RAG models) or `PromptedCritic` (any model).
        settings: `SelfRagSettings`.
        params: base generation settings for candidates (max_new_tokens, temperature...).
    """

    def __init__(self, generator: Generator, critic: Critic, settings: SelfRagSettings,
                 params: GenerationParams):
        self.generator, self.critic, self.settings, self.params = generator, critic, settings, params
        self.weights = _weights(settings)

    # --- retrieval decision -------------------------------------------------------------
    async def decide(self, questions: Sequence[str]) -> list[tuple[bool, float | None]]:
        s = self.settings
        if s.mode != "adaptive":
            return [(s.mode == "always", None)] * len(questions)
        ret, no_ret = self.critic.retrieval_ids()
        steps = await self.critic.retrieval_steps([self.critic.prompt(q) for q in questions])
        return [should_retrieve(step, ret, no_ret, s.threshold, compat_log_ratio=s.compat_log_ratio)
                for step in steps]

    # --- short form ---------------------------------------------------------------------
    async def short_form(self, questions: Sequence[str], search: SearchFn | None, top_k: int,
                         hits: Sequence[Sequence[Hit]] | None = None) -> list[Answer]:
        """Answer each question; ``hits`` (pre-retrieved passages) replace ``search``."""
        t0 = time.perf_counter()
        decisions = await self.decide(questions)
        retrieve = [i for i, (d, _) in enumerate(decisions) if d]
        found: dict[int, list[Hit]] = {}
        if retrieve:
            if hits is not None:
                found = {i: list(hits[i])[:top_k] for i in retrieve}
            elif search is not None:
                found = dict(zip(retrieve, await search([questions[i] for i in retrieve], top_k), strict=True))
        t_ret = time.perf_counter() - t0
        screened = await self._screen(questions, found)
        prompts: list[str] = []
        owners: list[tuple[int, Hit | None]] = []
        for i, q in enumerate(questions):
            if found.get(i):
                for h in [h for h, _ in screened[i]] if i in screened else found[i]:
                    prompts.append(self.critic.candidate_prompt(q, h.passage))
                    owners.append((i, h))
            else:
                prompts.append(self.critic.no_retrieval_prompt(q))
                owners.append((i, None))
        t1 = time.perf_counter()
        gens = await self.generator.agenerate(prompts, self.critic.candidate_params(self.params))
        t_gen = time.perf_counter() - t1
        t2 = time.perf_counter()
        critiques = iter(await self._critique(questions, owners, gens, screened))
        t_crit = time.perf_counter() - t2
        per_q: dict[int, list[tuple[Hit | None, Generation, Critique | None]]] = {}
        for (i, maybe_hit), g in zip(owners, gens, strict=True):
            per_q.setdefault(i, []).append((maybe_hit, g, next(critiques) if maybe_hit else None))
        n = max(1, len(questions))
        timings = Timings(retrieval_s=t_ret / n, generation_s=t_gen / n, critique_s=t_crit / n)
        return [self._short_answer(decisions[i], per_q[i], found.get(i, []), timings)
                for i in range(len(questions))]

    async def _critique(self, questions: Sequence[str], owners: Sequence[tuple[int, Hit | None]],
                        gens: Sequence[Generation], screened: dict[int, list[tuple[Hit, float]]]) -> list[Critique]:
        """Critiques of the candidates that have a passage, in order. A question the screen left
        with one candidate has nothing to choose between: a critic that asks the model
        (`PromptedCritic`) is not asked its IsSup/IsUse unless ``critique_single`` (its s_rel is
        the screen's, s_sup and s_use are None)."""
        relevance = {i: iter([r for _, r in screened[i]]) for i in screened}
        single = {i for i, kept in screened.items() if len(kept) == 1
                  and self.critic.asks_model and not self.settings.critique_single}
        items: list[tuple[str, Passage, Generation]] = []
        rel: list[float] = []
        out: list[Critique | None] = []
        for (i, h), g in zip(owners, gens, strict=True):
            if h is None:
                continue
            r = next(relevance[i]) if i in relevance else None
            if i in single:
                out.append(combine(r or 0.0, None, None, sequence_score(g.token_logprobs), self.weights))
            else:
                out.append(None)
                items.append((questions[i], h.passage, g))
                rel.append(r or 0.0)
        asked = iter(await self.critic.critique(items, self.weights, rel if screened else None) if items else [])
        return [c if c is not None else next(asked) for c in out]

    async def _screen(self, questions: Sequence[str], found: dict[int, list[Hit]]
                      ) -> dict[int, list[tuple[Hit, float]]]:
        """``candidates: N``: ask IsRel of every retrieved passage (one token each, no answer
        yet) and keep, per question, the N with the highest ``w_rel*s_rel + w_ret/rank`` (in that
        order, each with its s_rel); empty when every passage gets a candidate."""
        keep = self.settings.candidates
        pairs = [(i, h) for i, hs in found.items() for h in hs]
        if keep is None or all(len(hs) <= keep for hs in found.values()) or not pairs:
            return {}
        rel = await self.critic.relevance([(questions[i], h.passage) for i, h in pairs])
        s = self.settings
        per_q: dict[int, list[tuple[float, Hit]]] = {}
        for (i, h), r in zip(pairs, rel, strict=True):
            per_q.setdefault(i, []).append((r, h))
        out = {}
        for i, scored in per_q.items():
            best = sorted(scored, key=lambda rh: -(s.w_rel * rh[0] + s.w_ret / rh[1].rank))[:keep]
            out[i] = [(h, r) for r, h in best]
        return out

    def _decision(self, retrieved: bool, probability: float | None) -> RetrievalDecision:
        return RetrievalDecision(decision="retrieve" if retrieved else "no_retrieval",
                                 probability=probability, mode=self.settings.mode,
                                 critic=self.critic.label)

    def _short_answer(self, decision: tuple[bool, float | None],
                      cands: list[tuple[Hit | None, Generation, Critique | None]],
                      retrieved: list[Hit], timings: Timings) -> Answer:
        retrieval = self._decision(cands[0][0] is not None, decision[1])
        tokens = sum(len(g.token_ids) for _, g, _ in cands)
        usage = Usage(prompt_tokens=sum(g.prompt_tokens for _, g, _ in cands), completion_tokens=tokens)
        if cands[0][0] is None:  # no retrieval: the single generation is the answer
            g = cands[0][1]
            return Answer(text=map_answer(self.settings.task, postprocess(g.text)), retrieval=retrieval,
                          usage=usage, timings=timings,
                          finish_reason=g.finish_reason,
                          trace=Trace(critic=self.critic.label, raw_completion=g.text))
        scored = [(h, g, c) for h, g, c in cands if h is not None and c is not None]
        scores = [_scores(h.passage, postprocess(g.text), c, h.rank, self.settings.w_ret) for h, g, c in scored]
        text = None
        if self.settings.closed:
            winner, sums = vote([s.text for s in scores], [s.total for s in scores])
            best = max(scores, key=lambda s: s.total if normalise_closed_answer(s.text) == winner else -math.inf)
            retrieval = retrieval.model_copy(update={"votes": sums})
            text = winner if is_label(winner) else None  # the voted label, as the metrics read it
        else:
            best = max(scores, key=lambda s: s.total)
        idx = scores.index(best)
        hit = scored[idx][0]
        return Answer(text=map_answer(self.settings.task, text or best.text),
                      citations=[Citation(id=hit.passage.id, title=hit.passage.title,
                                                          score=hit.score)],
                      hits=retrieved, scores=scores, retrieval=retrieval, usage=usage,
                      timings=timings, finish_reason=scored[idx][1].finish_reason,
                      trace=Trace(critic=self.critic.label, best_candidate=idx,
                                  raw_completion=scored[idx][1].text))

    # --- long form ----------------------------------------------------------------------
    async def long_form(self, question: str, search: SearchFn | None, top_k: int,
                        hits: Sequence[Hit] | None = None) -> Answer:
        if not isinstance(self.critic, TokenCritic):
            raise ConfigError("long-form tree search needs a Self-RAG model (critic: tokens): "
                              "segments are delimited by the [Retrieval] token")
        return await TreeSearch(self, question, search, top_k, hits).run()


@dataclass(slots=True)
class Node:
    """One segment in the tree. ``prefix`` is everything before this node's segment (its own
    parent's prefix + the parent's segment + this node's paragraph); ``text_prefix`` is the
    same without any paragraph (the prompt and the path's segments)."""

    prefix: str
    text_prefix: str = ""
    segment: str = ""
    passage: Passage | None = None
    hit: Hit | None = None
    segment_scores: list[float] = field(default_factory=list)
    critique: Critique | None = None
    parent: Node | None = None
    depth: int = 0
    done: bool = False
    wants_retrieval: bool = True
    node_id: int = 0

    def path(self) -> list[Node]:
        out: list[Node] = []
        node: Node | None = self
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


class TreeSearch:
    """Segment-level beam search over passages (spec section 4)."""

    def __init__(self, decoder: SelfRagDecoder, question: str, search: SearchFn | None, top_k: int,
                 static_hits: Sequence[Hit] | None):
        self.d, self.q, self.search, self.top_k = decoder, question, search, top_k
        self.static_hits = list(static_hits) if static_hits is not None else None
        assert isinstance(decoder.critic, TokenCritic)  # checked by the decoder before the search
        self.critic = decoder.critic
        self.t = self.critic.tokens
        self.s = decoder.settings
        self.nodes: list[Node] = []
        self.usage = [0, 0]  # prompt, completion tokens over every generation call

    def _new(self, **kw: Any) -> Node:
        node = Node(node_id=len(self.nodes), **kw)
        self.nodes.append(node)
        return node

    def _path_score(self, scores: Sequence[float]) -> float:
        if self.s.path_score == "product":
            return math.prod(scores)
        return sum(scores) / len(scores)

    async def _passages(self, expand: Sequence[Node]) -> list[list[Hit]]:
        if self.s.segment_retrieval == "static" or self.static_hits is not None:
            if self.static_hits is None:
                assert self.search is not None
                self.static_hits = (await self.search([self.q], self.top_k))[0]
            return [self.static_hits[: self.top_k]] * len(expand)
        if self.search is None:
            raise ConfigError("per-segment retrieval needs a retriever (or use segment_retrieval: static)")
        queries = [self.q if n.parent is None else
                   f"{self.q} {postprocess(n.segment)}".strip() for n in expand]
        return await self.search(queries, self.top_k)

    def _split(self, g: Generation) -> tuple[str, bool, bool]:
        """(segment text, wants retrieval, done) from one child generation: the segment ends at
        the first retrieval point, a ``[No Retrieval]`` the threshold re-maps to retrieval or the
        ``[Retrieval]`` that stopped the generation, whichever comes first (spec section 4)."""
        ids = g.token_ids
        for j, tid in enumerate(ids):
            if tid == self.t.no_retrieval and j < len(g.logprobs):
                step = g.logprobs[j]
                pr = [math.exp(step.get(i, -100.0)) for i in (self.t.retrieval, self.t.continue_evidence,
                                                               self.t.no_retrieval)]
                ratio = (pr[0] + pr[1]) / (pr[0] + pr[2]) if pr[0] + pr[2] > 0 else 0.0
                if ratio > self.s.threshold:
                    text = self.critic.generator.decode(ids[:j])
                    return text, True, False
        if ids and ids[-1] == self.t.retrieval and g.finish_reason == "stop":
            return g.text, True, False
        return g.text, False, True

    async def run(self) -> Answer:
        t0 = time.perf_counter()
        prompt = self.critic.prompt(self.q)
        root = self._new(prefix=prompt, text_prefix=prompt)
        (decision,) = await self.d.decide([self.q])
        retrieval = self.d._decision(decision[0], decision[1])
        params = self.critic.candidate_params(self.d.params).model_copy(
            update={"stop_token_ids": [self.t.retrieval]})
        if not decision[0]:
            (g,) = await self.d.generator.agenerate([root.prefix + "[No Retrieval]"], self.d.params)
            text = postprocess(g.text.split("\n\n")[0])  # the script keeps the first paragraph
            return Answer(text=text, retrieval=retrieval, finish_reason=g.finish_reason,
                          usage=Usage(prompt_tokens=g.prompt_tokens, completion_tokens=len(g.token_ids)),
                          trace=Trace(critic=self.critic.label, raw_completion=g.text))
        live, leaves = [root], []
        for depth in range(1, self.s.max_depth + 1):
            expand = [n for n in live if n.wants_retrieval and not n.done]
            if not expand:
                break
            prompts, meta = [], []
            for node, hits in zip(expand, await self._passages(expand), strict=True):
                # the node's OWN prefix, never a sibling's; "newest" drops earlier paragraphs
                base = (node.text_prefix if self.s.segment_context == "newest" else node.prefix) + node.segment
                for h in hits:
                    para = selfrag_paragraph(h.passage, self.critic.extra_control)
                    prompts.append(base + para)
                    meta.append((node, h, base + para, node.text_prefix + node.segment))
            gens = await self.d.generator.agenerate(prompts, params)
            self.usage[0] += sum(g.prompt_tokens for g in gens)
            self.usage[1] += sum(len(g.token_ids) for g in gens)
            children = []
            for (node, h, prefix, text_prefix), g in zip(meta, gens, strict=True):
                crit = critique_generation(g, relevant=self.t.relevant, irrelevant=self.t.irrelevant,
                                           support=self.t.support, utility=self.t.utility,
                                           w=self.d.weights)
                text, wants, done = self._split(g)
                children.append(self._new(prefix=prefix, text_prefix=text_prefix, segment=text,
                                          passage=h.passage, hit=h,
                                          segment_scores=node.segment_scores + [crit.total],
                                          critique=crit, parent=node, depth=depth, done=done,
                                          wants_retrieval=wants))
            children.sort(key=lambda n: self._path_score(n.segment_scores), reverse=True)
            kept = children[: self.s.beam_width]
            leaves += [n for n in kept if n.done]
            live = [n for n in kept if not n.done]
        leaves += [n for n in live if n is not root]
        if not leaves:
            return Answer(text="", retrieval=retrieval, trace=Trace(critic=self.critic.label))
        if self.s.select == "deepest":
            deepest = max(n.depth for n in leaves)
            leaves = [n for n in leaves if n.depth == deepest]
        best = max(leaves, key=lambda n: self._path_score(n.segment_scores))
        return self._answer(best, retrieval, time.perf_counter() - t0)

    def _answer(self, best: Node, retrieval: RetrievalDecision, seconds: float) -> Answer:
        cited: list[Hit] = []
        parts = []
        for node in best.path()[1:]:
            assert node.hit is not None
            ids = [h.passage.id for h in cited]
            if node.hit.passage.id not in ids:
                cited.append(node.hit)
                ids.append(node.hit.passage.id)
            # [Continue to Use Evidence] ends a cited sentence of the same passage (the reference)
            for piece in strip_reflection(node.segment, keep_continue=True).split(CONTINUE):
                text = " ".join(piece.split())
                if text:
                    parts.append(cite(text, ids.index(node.hit.passage.id) + 1))
        scores = [_scores(n.passage, " ".join(strip_reflection(n.segment).split()), n.critique)
                  for n in best.path()[1:] if n.critique is not None]
        tree = [TreeNode(id=n.node_id, parent=n.parent.node_id if n.parent else None, depth=n.depth,
                         passage_id=n.passage.id if n.passage else None, segment=n.segment,
                         score=self._path_score(n.segment_scores) if n.segment_scores else None,
                         done=n.done) for n in self.nodes]
        return Answer(text=fix_spacing(" ".join(parts)),
                      citations=[Citation(id=h.passage.id, title=h.passage.title, score=h.score) for h in cited],
                      hits=cited, scores=scores, retrieval=retrieval,
                      usage=Usage(prompt_tokens=self.usage[0], completion_tokens=self.usage[1]),
                      timings=Timings(generation_s=seconds),
                      trace=Trace(critic=self.critic.label, tree=tree, best_node=best.node_id))


def cite(segment: str, number: int) -> str:
    """``segment`` with the citation ``[number]`` inside its last sentence, before the closing
    punctuation ("Paris is in France [1]."), as the reference writes it: ALCE splits the output
    into sentences and credits a citation to the sentence it stands in."""
    end = len(segment.rstrip(".!?"))
    return f"{segment[:end]} [{number}]{segment[end:]}"


_CITATION = re.compile(r" \[\d+\]")


def uncite(text: str) -> str:
    """The output without its ``[i]`` citation markers ("Paris is in France [1]." -> "Paris is
    in France."): what FActScore scores."""
    return _CITATION.sub("", text)


def to_alce(question: str, answer: Answer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ALCE record: the item's own fields (``extra``: ``qa_pairs``, ``annotations``,
    ``topic`` ... that the scorers read), ``question``, ``output`` with ``[i]`` citations, and
    ``docs`` in citation order (``[1]`` is ``docs[0]``)."""
    return {**(extra or {}), "question": question, "output": answer.text,
            "docs": [{"id": h.passage.id, "title": h.passage.title, "text": h.passage.text}
                     for h in answer.hits]}
