"""Critics: where the IsRel / IsSup / IsUse / Retrieve probabilities come from.

`TokenCritic` reads the reflection tokens a Self-RAG model emits (exact logprobs of their ids).
`PromptedCritic` works with any instruct model: it asks one short question per aspect and reads
the probabilities of the answer options' first tokens, normalised within the option set, in
place of the reflection-token probabilities. Both feed the same scoring formula.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Protocol

from rag.errors import ConfigError
from rag.generation import Generator
from rag.prompts import ChatFormat, get_format, selfrag_paragraph, selfrag_prompt
from rag.prompts.sanitize import neutralize
from rag.selfrag.scoring import (
    Critique,
    Weights,
    combine,
    critique_generation,
    normalised,
    relevance_score,
    sequence_score,
    support_score,
    utility_score,
)
from rag.selfrag.tokens import ReflectionTokens
from rag.types import ChatMessage, Generation, GenerationParams, Passage


class Critic(Protocol):
    """What the Self-RAG decoder asks of a critic: the prompts, the retrieval decision's token
    steps, passage relevance and the critique of each candidate."""

    label: str
    asks_model: bool  # IsSup/IsUse cost model calls (false: read off the candidates' tokens)

    def prompt(self, question: str) -> str: ...

    async def retrieval_steps(self, prompts: Sequence[str]) -> list[dict[int, float]]: ...

    def retrieval_ids(self) -> tuple[int, int]: ...

    def no_retrieval_prompt(self, question: str) -> str: ...

    def candidate_prompt(self, question: str, passage: Passage) -> str: ...

    def candidate_params(self, base: GenerationParams) -> GenerationParams: ...

    async def relevance(self, pairs: Sequence[tuple[str, Passage]]) -> list[float]: ...

    async def critique(self, items: Sequence[tuple[str, Passage, Generation]], w: Weights,
                       relevance: Sequence[float] | None = None) -> list[Critique]: ...


class TokenCritic:
    """Self-RAG models: candidates carry their own critique as reflection tokens."""

    label = "reflection-tokens"
    asks_model = False  # the critique is read off the candidates' own tokens

    def __init__(self, generator: Generator, *, instruction: str | None = None):
        self.generator = generator
        self.tokens = ReflectionTokens.from_generator(generator)
        self.instruction = instruction
        self.extra_control = generator.control_strings()
        if generator.exact_token_logprobs is False:  # a remote server that lacks them (known after load)
            raise ConfigError(
                f"critic: tokens needs exact logprobs of the reflection tokens, and the server of "
                f"{generator.model_name} does not return logprobs of requested token ids "
                "(vLLM's logprob_token_ids); serve the model with vllm serve, or use critic: prompted")

    def prompt(self, question: str) -> str:
        q = neutralize(question, self.extra_control)
        if self.instruction:
            return selfrag_prompt(self.instruction.replace("{question}", q))
        return selfrag_prompt(q)

    async def retrieval_steps(self, prompts: Sequence[str]) -> list[dict[int, float]]:
        """Next-token logprobs of [Retrieval]/[No Retrieval] right after each prompt."""
        t = self.tokens
        gens = await self.generator.agenerate(list(prompts), GenerationParams(
            max_new_tokens=1, logprob_token_ids=[t.retrieval, t.no_retrieval]))
        return [g.logprobs[0] if g.logprobs else {} for g in gens]

    def retrieval_ids(self) -> tuple[int, int]:
        return self.tokens.retrieval, self.tokens.no_retrieval

    def no_retrieval_prompt(self, question: str) -> str:
        return self.prompt(question) + "[No Retrieval]"

    def candidate_prompt(self, question: str, passage: Passage) -> str:
        return self.prompt(question) + selfrag_paragraph(passage, self.extra_control)

    def candidate_params(self, base: GenerationParams) -> GenerationParams:
        return base.model_copy(update={"logprob_token_ids": self.tokens.all_ids})

    async def relevance(self, pairs: Sequence[tuple[str, Passage]]) -> list[float]:
        """IsRel of each (question, passage) before any answer: the [Relevant]/[Irrelevant]
        probabilities at the first position after the candidate prompt (what its generation
        would read there, so its critique later agrees)."""
        t = self.tokens
        gens = await self.generator.agenerate([self.candidate_prompt(q, p) for q, p in pairs],
                                              GenerationParams(max_new_tokens=1,
                                                               logprob_token_ids=[t.relevant, t.irrelevant]))
        return [relevance_score(normalised(g.logprobs[0] if g.logprobs else {}, [t.relevant, t.irrelevant]))
                for g in gens]

    async def critique(self, items: Sequence[tuple[str, Passage, Generation]], w: Weights,
                       relevance: Sequence[float] | None = None) -> list[Critique]:
        """Scores for (question, passage, generation) triples, read off the generations
        (``relevance``, a screen's, is the same number and not needed here)."""
        t = self.tokens
        return [critique_generation(g, relevant=t.relevant, irrelevant=t.irrelevant,
                                    support=t.support, utility=t.utility, w=w) for _, _, g in items]


# The candidate prompt keeps the instruction first: 16/24 SQuAD answers that way against 12/24
# with the question first. IsSup and IsUse follow the candidate's answer in its conversation, so an
# engine with prefix caching (vLLM) computes only their own tokens. REL_Q (selfrag.relevance:
# question) is appended to the candidate's request.
CANDIDATE_Q = "Answer the question using the passage.\n\nPassage: {passage}\n\nQuestion: {question}"
REL_Q = "Does the passage contain the answer to the question? Answer Yes or No."
SUP_Q = "Is your answer supported by the passage? Answer Fully, Partially or No."
USE_Q = ("How useful is your answer to the question, from 1 (useless) to 5 (complete and helpful)? "
         "Reply with one digit.")
# Relevance by query likelihood (Sachan et al. 2022, "UPR"): how likely the model finds the
# question as a reply to this request, over the question's passages. On 300 SQuAD-dev questions
# SmolLM2-135M's pick by it answered 0.303 (match) against 0.257 for the top-ranked passage and
# 0.273 for naive RAG, where the Yes/No question (REL_Q) could not tell passages apart. (Read off
# the candidate's own request instead, after "Question:", so that the answer's prefill would come
# from the prefix cache, it cost 1.97x naive RAG against this prompt's 1.93x on 64 questions and
# picked worse there: 0.250 against 0.297.)
QL_Q = "Passage: {passage}\n\nWrite a question that this passage answers."
RET_Q = ("Question: {question}\n\nWould looking up documents help to answer this question "
         "correctly? Answer Yes or No.")


async def query_loglikelihoods(generator: Generator, fmt: ChatFormat,
                               pairs: Sequence[tuple[str, Passage]]) -> list[float]:
    """log p(question | passage) for each (question, passage): the question's tokens after the
    request `QL_Q` in ``fmt``, summed from the prompt logprobs of one prefill per pair (only the
    question's positions' logits: ``GenerationParams.prompt_logprobs_tail``). The prompted
    critic's relevance and the ``llm`` reranker (`rag.rerank`)."""
    prompts, lengths = [], []
    for q, p in pairs:
        head = fmt.render([ChatMessage(role="user", content=QL_Q.format(passage=p.title_text))])
        full = generator.encode(head + fmt.clean(q))
        prompts.append(full)
        lengths.append(max(1, len(full) - len(generator.encode(head))))
    by_length: dict[int, list[int]] = {}  # a call per question length: each prompt's own tail only
    for k, n in enumerate(lengths):
        by_length.setdefault(n, []).append(k)
    lls = [0.0] * len(pairs)
    groups_out = await asyncio.gather(*(generator.agenerate(
        [prompts[k] for k in ks], GenerationParams(max_new_tokens=1, prompt_logprobs=True, prompt_logprobs_tail=n))
        for n, ks in by_length.items()))
    for (n, ks), outs in zip(by_length.items(), groups_out, strict=True):
        for k, o in zip(ks, outs, strict=True):
            lls[k] = sum(o.prompt_logprobs[-n:])
    return lls


class PromptedCritic:
    """Any instruct model: the model answers with each passage in its own chat format, then is
    asked one question per aspect; option first-token probabilities stand in for the reflection
    tokens (Yes/No -> IsRel, Fully/Partially/No -> IsSup, 1..5 -> IsUse)."""

    label = "prompted"
    asks_model = True  # IsSup/IsUse are questions to the model

    def __init__(self, generator: Generator, fmt: ChatFormat | None = None, *,
                 instruction: str | None = None, relevance: str = "likelihood"):
        if relevance not in ("likelihood", "question"):
            raise ConfigError(f"selfrag.relevance {relevance!r}: use likelihood or question")
        self.relevance_by = relevance
        self.generator = generator
        self.extra_control = generator.control_strings()
        self.format = fmt or get_format("hf_template", generator=generator, extra_control=self.extra_control)
        self.instruction = instruction
        self.yes_no = generator.first_token_ids(["Yes", "No"])
        self.support = generator.first_token_ids(["Fully", "Partially", "No"])
        self.utility = generator.first_token_ids(["1", "2", "3", "4", "5"])

    def _chat(self, content: str) -> str:
        return self.format.render([ChatMessage(role="user", content=content)])

    def _candidate_turn(self, question: str, passage: Passage) -> ChatMessage:
        return ChatMessage(role="user", content=CANDIDATE_Q.format(passage=passage.title_text,
                                                                  question=self._q(question)))

    def _q(self, question: str) -> str:
        return self.instruction.replace("{question}", question) if self.instruction else question

    async def retrieval_steps(self, prompts: Sequence[str]) -> list[dict[int, float]]:
        gens = await self.generator.agenerate([self._chat(RET_Q.format(question=p)) for p in prompts],
                                       GenerationParams(max_new_tokens=1, logprob_token_ids=self.yes_no))
        return [g.logprobs[0] if g.logprobs else {} for g in gens]

    def retrieval_ids(self) -> tuple[int, int]:
        return self.yes_no[0], self.yes_no[1]

    def prompt(self, question: str) -> str:
        """For the decision: the raw question; the chat formatting happens in retrieval_steps."""
        return question

    def no_retrieval_prompt(self, question: str) -> str:
        return self._chat(self._q(question))

    def candidate_prompt(self, question: str, passage: Passage) -> str:
        return self.format.render([self._candidate_turn(question, passage)])

    def candidate_params(self, base: GenerationParams) -> GenerationParams:
        return base

    def _relevance_prompt(self, question: str, passage: Passage) -> str:
        # relevance does not depend on the answer: asked in the candidate's own first turn
        ask = self._candidate_turn(question, passage)
        return self.format.render([ChatMessage(role="user", content=f"{ask.content}\n\n{REL_Q}")])

    async def relevance(self, pairs: Sequence[tuple[str, Passage]]) -> list[float]:
        """IsRel of each (question, passage) before any answer is generated.

        ``likelihood`` (default): log p(question | passage) from the prompt logprobs of the
        question's tokens after one prefill per passage (only those positions' logits: see
        ``GenerationParams.prompt_logprobs_tail``), turned into a distribution over each
        question's passages (softmax: p(passage | question) under a uniform prior).
        ``question``: the Yes/No question REL_Q."""
        if self.relevance_by == "question":
            outs = await self.generator.agenerate([self._relevance_prompt(q, p) for q, p in pairs],
                                                  GenerationParams(max_new_tokens=1, logprob_token_ids=self.yes_no))
            return [relevance_score(normalised(o.logprobs[0] if o.logprobs else {}, self.yes_no)) for o in outs]
        lls = await query_loglikelihoods(self.generator, self.format, pairs)
        groups: dict[str, list[int]] = {}
        for k, (q, _) in enumerate(pairs):
            groups.setdefault(q, []).append(k)
        out = [0.0] * len(pairs)
        for ks in groups.values():  # softmax over each question's passages
            top = max(lls[k] for k in ks)
            z = sum(math.exp(lls[k] - top) for k in ks)
            for k in ks:
                out[k] = math.exp(lls[k] - top) / z
        return out

    async def critique(self, items: Sequence[tuple[str, Passage, Generation]], w: Weights,
                       relevance: Sequence[float] | None = None) -> list[Critique]:
        """Scores per (question, passage, generation): IsRel from `relevance` (unless a screen's
        ``relevance`` is given), IsSup and IsUse as one-token questions continuing the candidate's
        conversation (prompt, answer, question), so the passage and the answer are in an engine's
        prefix cache."""
        if not items:
            return []
        if relevance is None:
            relevance = await self.relevance([(q, p) for q, p, _ in items])
        prompts = []
        for question, p, g in items:
            turns = [self._candidate_turn(question, p), ChatMessage(role="assistant", content=g.text.strip())]
            prompts += [self.format.render([*turns, ChatMessage(role="user", content=q)]) for q in (SUP_Q, USE_Q)]
        ids = sorted(set(self.support + self.utility))
        outs = await self.generator.agenerate(prompts, GenerationParams(max_new_tokens=1, logprob_token_ids=ids))
        result = []
        for i, (_, _, g) in enumerate(items):
            sup, use = (o.logprobs[0] if o.logprobs else {} for o in outs[2 * i: 2 * i + 2])
            result.append(combine(relevance[i], support_score(normalised(sup, self.support)),
                                  utility_score(normalised(use, self.utility)),
                                  sequence_score(g.token_logprobs), w))
        return result


def make_critic(kind: str, generator: Generator, *, instruction: str | None = None,
                fmt: ChatFormat | None = None, relevance: str = "likelihood") -> Critic:
    if kind == "tokens":
        return TokenCritic(generator, instruction=instruction)
    if kind == "prompted":
        return PromptedCritic(generator, fmt, instruction=instruction, relevance=relevance)
    raise ConfigError(f"unknown critic {kind!r}; use tokens or prompted")
