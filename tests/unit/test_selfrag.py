"""Self-RAG scoring and decoding with a scripted generator and hand-computed expectations."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest

from rag.config import SelfRagSettings, pipeline_config
from rag.errors import ConfigError
from rag.generation.scripted import ScriptedGenerator, ScriptedTokenizer
from rag.pipeline import SelfRagPipeline
from rag.prompts.sanitize import REFLECTION_TOKENS
from rag.selfrag.critic import TokenCritic
from rag.selfrag.decoder import SelfRagDecoder, to_alce
from rag.selfrag.scoring import (
    Weights,
    critique_generation,
    normalise_closed_answer,
    normalised,
    postprocess,
    sequence_score,
    should_retrieve,
    vote,
)
from rag.selfrag.tokens import ReflectionTokens
from rag.types import ChatMessage, Generation, GenerationParams, Hit, Passage
from tests.unit.conftest import FixedRetriever

TOK = ScriptedTokenizer(REFLECTION_TOKENS)
T = ReflectionTokens.from_generator(ScriptedGenerator(tokenizer=TOK))
ln = math.log


def gen(pieces: Sequence[str], steps: Sequence[dict[str, float]] | None = None, *,
        token_lp: float = -0.2, stop_at_retrieval: bool = False) -> Generation:
    """A generation of ``pieces`` (strings; reflection tokens become their ids), with per-position
    requested logprobs given as {token string: probability}."""
    ids = [TOK.id_of(p) for p in pieces]
    text = "".join(pieces)
    if stop_at_retrieval:  # backends drop the stop token from the text but keep its id
        ids.append(T.retrieval)
    logprobs = [{TOK.id_of(k): ln(v) for k, v in step.items()} for step in (steps or [])]
    logprobs += [{}] * (len(ids) - len(logprobs))
    return Generation(text=text, token_ids=ids, token_logprobs=[token_lp] * len(ids),
                      logprobs=logprobs, finish_reason="stop")


def hit(pid: str, score: float = 1.0, rank: int = 1) -> Hit:
    return Hit(passage=Passage(id=pid, title=f"T{pid}", text=f"text of {pid}"), score=score, rank=rank)


W = Weights(rel=1.0, sup=1.0, use=0.5, seq=True)


def short_form(dec: SelfRagDecoder, questions: Sequence[str], search, k: int):  # type: ignore[no-untyped-def]
    """The async decoder from a test, with a plain function as its search."""
    async def asearch(qs: Sequence[str], top_k: int) -> list[list[Hit]]:
        return search(qs, top_k)  # type: ignore[no-any-return]
    return asyncio.run(dec.short_form(questions, asearch, k))


def long_form(dec: SelfRagDecoder, question: str, search, k: int):  # type: ignore[no-untyped-def]
    async def asearch(qs: Sequence[str], top_k: int) -> list[list[Hit]]:
        return search(qs, top_k)  # type: ignore[no-any-return]
    return asyncio.run(dec.long_form(question, asearch, k))


def crit(g: Generation, w: Weights = W):  # type: ignore[no-untyped-def]
    return critique_generation(g, relevant=T.relevant, irrelevant=T.irrelevant, support=T.support,
                               utility=T.utility, w=w)


# --- tokens ---------------------------------------------------------------------------


def test_reflection_ids_come_from_the_tokenizer_and_missing_ones_are_named() -> None:
    assert T.retrieval == TOK.convert_tokens_to_ids("[Retrieval]") and len(set(T.all_ids)) == 15
    with pytest.raises(ConfigError, match=r"lacks the Self-RAG reflection tokens.*\[Retrieval\].*critic: prompted"):
        ReflectionTokens.from_generator(ScriptedGenerator(tokenizer=ScriptedTokenizer(["[No Retrieval]"])))


# --- scoring: every branch ----------------------------------------------------------------


def test_all_aspects_present_hand_computed() -> None:
    g = gen(["[Relevant]", "Paris", "[Fully supported]", "[Utility:5]"], [
        {"[Relevant]": 0.6, "[Irrelevant]": 0.2},
        {},
        {"[Fully supported]": 0.25, "[Partially supported]": 0.15, "[No support / Contradictory]": 0.1},
        {"[Utility:4]": 0.2, "[Utility:5]": 0.2}], token_lp=-0.3)
    c = crit(g)
    assert c.s_rel == pytest.approx(0.75)
    assert c.s_sup == pytest.approx(0.5 + 0.5 * 0.3)  # renormalised inside the group (S = 0.5)
    # utilities 1-3 missing -> exp(-100) each; 4 and 5 share the mass equally
    assert c.s_use == pytest.approx(0.5 * 0.5 + 1.0 * 0.5, abs=1e-9)
    assert c.seq == pytest.approx(math.exp(-0.3))
    assert c.total == pytest.approx(math.exp(-0.3) + 0.75 + 0.65 + 0.5 * 0.75)


def test_no_issup_and_no_utility_emitted_score_zero() -> None:
    c = crit(gen(["[Irrelevant]", "nope"], [{"[Relevant]": 0.1, "[Irrelevant]": 0.9}], token_lp=-1.0))
    assert (c.s_sup, c.s_use) == (0.0, 0.0)
    assert c.s_rel == pytest.approx(0.1)
    assert c.total == pytest.approx(math.exp(-1.0) + 0.1)


def test_missing_tokens_count_as_exp_minus_100_not_minus_100() -> None:
    # [Irrelevant] absent from the position: p = exp(-100), so s_rel is ~1, not a negative number
    c = crit(gen(["[Relevant]"], [{"[Relevant]": 0.5}]))
    assert c.s_rel == pytest.approx(1.0) and 0 < c.s_rel <= 1
    both_missing = normalised({}, [T.relevant, T.irrelevant])
    assert both_missing == [0.5, 0.5]


def test_weights_and_seq_switch() -> None:
    g = gen(["[Relevant]", "x", "[Partially supported]"], [
        {"[Relevant]": 1.0}, {},
        {"[Fully supported]": 0.0001, "[Partially supported]": 0.9998, "[No support / Contradictory]": 0.0001}])
    c = crit(g, Weights(rel=2.0, sup=3.0, use=0.5, seq=False))
    assert c.total == pytest.approx(2.0 * 1.0 + 3.0 * (0.0001 + 0.5 * 0.9998), rel=1e-4)
    assert sequence_score([]) == 0.0


@pytest.mark.parametrize(("p_ret", "expected"), [(0.3, True), (0.21, True), (0.19, False), (0.1, False)])
def test_threshold_both_sides(p_ret: float, expected: bool) -> None:
    step = {T.retrieval: ln(p_ret * 0.5), T.no_retrieval: ln((1 - p_ret) * 0.5)}
    decision, p = should_retrieve(step, T.retrieval, T.no_retrieval, 0.2)
    assert decision is expected and p == pytest.approx(p_ret)


def test_compat_log_ratio_reproduces_the_reference_inversion() -> None:
    step = {T.retrieval: ln(0.9), T.no_retrieval: ln(0.1)}  # retrieval is very likely
    assert should_retrieve(step, T.retrieval, T.no_retrieval, 0.2)[0] is True
    decision, ratio = should_retrieve(step, T.retrieval, T.no_retrieval, 0.2, compat_log_ratio=True)
    assert decision is False and ratio == pytest.approx(ln(0.9) / (ln(0.9) + ln(0.1)))


def test_postprocess_and_closed_normalisation() -> None:
    assert postprocess("[Relevant]Paris\nis big.[Fully supported][Utility:5]</s>") == "Paris is big."
    assert normalise_closed_answer("B) 42") == "B"
    assert normalise_closed_answer("True, it is.") == "true"
    assert normalise_closed_answer("no") == "false"


def test_closed_task_vote_sums_scores_of_equal_answers() -> None:
    winner, sums = vote(["false", "true", "True."], [1.0, 0.6, 0.6])
    assert winner == "true" and sums == {"false": 1.0, "true": pytest.approx(1.2)}


# --- short-form decoder ---------------------------------------------------------------------


PROMPT = "### Instruction:\nWhere is the Eiffel Tower?\n\n### Response:\n"


def candidate(rel: float, text: str, sup: str, use: int) -> Generation:
    sup_probs = {"[Fully supported]": 0.8 if sup == "full" else 0.1,
                 "[Partially supported]": 0.1, "[No support / Contradictory]": 0.1 if sup == "full" else 0.8}
    return gen([f"[{'Relevant' if rel > 0.5 else 'Irrelevant'}]", text, "[Fully supported]", f"[Utility:{use}]"],
               [{"[Relevant]": rel, "[Irrelevant]": 1 - rel}, {}, sup_probs, {f"[Utility:{use}]": 0.9}])


def decoder(script: list, settings: SelfRagSettings,  # type: ignore[type-arg]
            default: Generation | None = None) -> tuple[SelfRagDecoder, ScriptedGenerator]:
    g = ScriptedGenerator(script, default=default, tokenizer=TOK)
    return SelfRagDecoder(g, TokenCritic(g), settings, GenerationParams(max_new_tokens=50)), g


def test_short_form_picks_the_best_critiqued_candidate_in_one_batched_call() -> None:
    cands = {"a": candidate(0.2, "Berlin", "none", 1), "b": candidate(0.9, "Paris", "full", 5),
             "c": candidate(0.7, "Lyon", "none", 3)}
    script = [(lambda p, k=k: p.startswith(PROMPT) and f"text of {k}" in p, g) for k, g in cands.items()]
    dec, g = decoder(script, SelfRagSettings(mode="always"))
    (answer,) = short_form(dec, ["Where is the Eiffel Tower?"], lambda qs, k: [[hit("a"), hit("b"), hit("c")]], 3)
    assert answer.text == "Paris" and answer.citations[0].id == "b"
    assert len(g.calls) == 1 and len(g.calls[0]) == 3  # K candidates, one call
    assert g.calls[0][1] == PROMPT + "[Retrieval]<paragraph>Tb\ntext of b</paragraph>"
    by_id = {s.passage_id: s for s in answer.scores}
    expected_b = crit(cands["b"]).total
    assert by_id["b"].total == pytest.approx(expected_b)
    assert by_id["b"].total > by_id["c"].total > by_id["a"].total
    assert answer.retrieval.decision == "retrieve" and answer.retrieval.critic == "reflection-tokens"


def test_adaptive_no_retrieval_generates_from_no_retrieval_prompt() -> None:
    decision = gen(["[No Retrieval]"], [{"[Retrieval]": 0.05, "[No Retrieval]": 0.95}])
    script = [(PROMPT, decision), (PROMPT + "[No Retrieval]", gen(["Paris.", "[Utility:5]"]))]
    dec, g = decoder(script, SelfRagSettings(mode="adaptive", threshold=0.2))
    searched: list[Sequence[str]] = []
    (answer,) = short_form(dec, ["Where is the Eiffel Tower?"], lambda qs, k: searched.append(qs) or [], 3)
    assert answer.text == "Paris." and searched == []
    assert answer.retrieval.model_dump() == {"decision": "no_retrieval", "probability": pytest.approx(0.05),
                                             "mode": "adaptive", "critic": "reflection-tokens", "votes": {}}
    assert answer.citations == [] and answer.scores == []


def test_adaptive_retrieval_above_threshold_retrieves() -> None:
    decision = gen(["[Retrieval]"], [{"[Retrieval]": 0.25, "[No Retrieval]": 0.75}])
    script = [(PROMPT, decision)]
    dec, _ = decoder(script, SelfRagSettings(mode="adaptive", threshold=0.2),
                     default=candidate(0.9, "Paris", "full", 5))
    (answer,) = short_form(dec, ["Where is the Eiffel Tower?"], lambda qs, k: [[hit("b")]], 1)
    assert answer.retrieval.decision == "retrieve" and answer.retrieval.probability == pytest.approx(0.25)


def test_closed_task_votes_over_normalised_answers() -> None:
    cands = {"a": candidate(0.7, "false", "none", 5), "b": candidate(0.6, "true", "none", 3),
             "c": candidate(0.6, "True.", "none", 3)}
    script = [(lambda p, k=k: f"text of {k}" in p, g) for k, g in cands.items()]
    dec, _ = decoder(script, SelfRagSettings(mode="always", task="closed"))
    (answer,) = short_form(dec, ["Claim?"], lambda qs, k: [[hit("a"), hit("b"), hit("c")]], 3)
    single_best = max(answer.scores, key=lambda s: s.total)
    assert single_best.passage_id == "a"  # alone "false" would win...
    assert normalise_closed_answer(answer.text) == "true"  # ...but two "true" votes sum higher
    assert answer.retrieval.votes["true"] > answer.retrieval.votes["false"]


def test_batch_of_questions_shares_one_candidate_call() -> None:
    dec, g = decoder([], SelfRagSettings(mode="always"), default=candidate(0.9, "x", "full", 5))
    answers = short_form(dec, ["q1", "q2"], lambda qs, k: [[hit("a"), hit("b")] for _ in qs], 2)
    assert len(answers) == 2 and len(g.calls) == 1 and len(g.calls[0]) == 4


# --- long-form tree search -------------------------------------------------------------------


SEGMENTS = {  # passage -> (relevance, segment text, asks for more evidence?)
    "a": (0.9, "Alpha one.", True), "b": (0.6, "Beta one.", True), "c": (0.1, "Gamma one.", True),
}


def tree_rule(prompt: str) -> Generation:
    depth = prompt.count("<paragraph>")
    last = prompt.rsplit("text of ", 1)[1][0]
    rel, text, more = SEGMENTS[last]
    if depth >= 2:
        text, more = text.replace("one", "two"), False
    return gen(["[Relevant]" if rel > 0.5 else "[Irrelevant]", text, "[Fully supported]"],
               [{"[Relevant]": rel, "[Irrelevant]": 1 - rel}, {},
                {"[Fully supported]": rel, "[Partially supported]": 0.0001,
                 "[No support / Contradictory]": 1 - rel}],
               stop_at_retrieval=more)


def test_tree_search_prunes_to_beam_width_and_builds_prefixes_from_own_parent() -> None:
    g = ScriptedGenerator(default=tree_rule, tokenizer=TOK)
    settings = SelfRagSettings(mode="always", decoding="long", beam_width=2, max_depth=3,
                               segment_retrieval="static")
    dec = SelfRagDecoder(g, TokenCritic(g), settings, GenerationParams(max_new_tokens=50))
    passages = [hit("a", rank=1), hit("b", rank=2), hit("c", rank=3)]
    answer = long_form(dec, "Tell me about it.", lambda qs, k: [passages for _ in qs], 3)
    depth1, depth2 = g.calls[0], g.calls[1]
    assert len(g.calls) == 2 and len(depth1) == 3
    assert len(depth2) == 6  # beam 2 (a, b) x 3 passages; c was pruned
    assert not any("Gamma one." in p for p in depth2)
    for p in depth2:  # each child extends exactly its own parent
        assert ("Alpha one." in p) != ("Beta one." in p)
        parent = "a" if "Alpha one." in p else "b"
        assert p.startswith(PROMPT.replace("Where is the Eiffel Tower?", "Tell me about it.")
                            + f"[Retrieval]<paragraph>T{parent}\ntext of {parent}</paragraph>[Relevant]"
                            + ("Alpha one." if parent == "a" else "Beta one.") + "[Fully supported][Retrieval]")
    assert answer.text == "Alpha one [1]. Alpha two [1]."  # inside each sentence, as ALCE reads it
    assert [c.id for c in answer.citations] == ["a"]
    tree = answer.trace.tree
    assert len(tree) == 1 + 3 + 6 and tree[answer.trace.best_node].depth == 2
    alce = to_alce("Tell me about it.", answer)
    assert alce["output"] == answer.text and alce["docs"][0]["id"] == "a"


def test_tree_search_citations_point_at_each_segments_passage() -> None:
    def rule(prompt: str) -> Generation:
        if prompt.count("<paragraph>") >= 2:  # at depth 2 only passage b is any good
            good = "text of b" in prompt.rsplit("<paragraph>", 1)[1]
            return gen(["[Relevant]" if good else "[Irrelevant]", "Second." if good else "Bad."],
                       [{"[Relevant]": 0.9 if good else 0.1, "[Irrelevant]": 0.1 if good else 0.9}])
        good = "text of a" in prompt
        return gen(["[Relevant]", "First."], [{"[Relevant]": 0.9 if good else 0.2,
                                                 "[Irrelevant]": 0.1 if good else 0.8}],
                   stop_at_retrieval=True)

    g = ScriptedGenerator(default=rule, tokenizer=TOK)
    settings = SelfRagSettings(mode="always", decoding="long", beam_width=1, max_depth=2,
                               segment_retrieval="per_segment")
    dec = SelfRagDecoder(g, TokenCritic(g), settings, GenerationParams(max_new_tokens=50))
    queries: list[list[str]] = []

    def search(qs: Sequence[str], k: int) -> list[list[Hit]]:
        queries.append(list(qs))
        return [[hit("a"), hit("b")] for _ in qs]

    answer = long_form(dec, "Q?", search, 2)
    assert answer.text == "First [1]. Second [2]."
    assert [c.id for c in answer.citations] == ["a", "b"]
    assert queries == [["Q?"], ["Q? First."]]  # per-segment: question + previous segment


def test_compat_product_and_deepest_selection() -> None:
    g = ScriptedGenerator(default=tree_rule, tokenizer=TOK)
    settings = SelfRagSettings(mode="always", decoding="long", beam_width=3, max_depth=2,
                               segment_retrieval="static", path_score="product", select="deepest")
    dec = SelfRagDecoder(g, TokenCritic(g), settings, GenerationParams(max_new_tokens=50))
    answer = long_form(dec, "Q", lambda qs, k: [[hit("a"), hit("b"), hit("c")] for _ in qs], 3)
    best = [n for n in answer.trace.tree if n.id == answer.trace.best_node][0]
    assert best.depth == 2
    scores = answer.scores
    assert best.score == pytest.approx(math.prod(s.total for s in scores))


def test_long_form_needs_reflection_tokens_and_pipeline_wiring() -> None:
    g = ScriptedGenerator(default=candidate(0.9, "Paris", "full", 5), tokenizer=TOK)
    config = pipeline_config(name="s", kind="selfrag", selfrag={"mode": "always"}, retrieval={"top_k": 2})

    pipe = SelfRagPipeline(config, g, FixedRetriever(lambda q: [hit("a"), hit("b")]))  # type: ignore[arg-type]
    a = pipe.ask("Where?")
    assert a.text == "Paris" and len(a.scores) == 2
    assert a.to_json()["scores"][0].keys() >= {"s_rel", "s_sup", "s_use", "seq", "total"}


# --- prompted critic: KV-shared critique questions, the retrieval prior, calibration ------------

def prompted_setup(p_yes: float, sup: tuple[float, float, float], use: Sequence[float],  # type: ignore[no-untyped-def]
                   relevance: str = "question", token_lp: dict[str, float] | None = None):
    """A scripted generator answering every critique question with the given option
    probabilities (chatml format: the scripted tokenizer has no chat template); with
    ``relevance="likelihood"``, the question's tokens get ``token_lp[passage id]`` each."""
    from rag.prompts import get_format
    from rag.selfrag.critic import REL_Q, SUP_Q, USE_Q, PromptedCritic

    g = ScriptedGenerator(tokenizer=ScriptedTokenizer())
    fmt = get_format("chatml", generator=g, extra_control=g.control_strings())
    critic = PromptedCritic(g, fmt, relevance=relevance)
    yes, no = critic.yes_no

    def step(ids: Sequence[int], ps: Sequence[float]) -> Generation:
        return Generation(text="x", token_ids=[ids[0]], token_logprobs=[-0.1],
                          logprobs=[{i: ln(p) for i, p in zip(ids, ps)}], finish_reason="stop")

    def likelihood(prompt: str) -> Generation:  # token-id prompts reach the script decoded, unspaced
        k = next(k for k in (token_lp or {}) if f"textof{k}" in prompt)
        return Generation(text="x", token_ids=[5], token_logprobs=[-0.1], finish_reason="stop",
                          prompt_logprobs=[(token_lp or {})[k]] * 200)

    g.script = [(lambda p: p.rstrip().endswith(REL_Q + "<|im_end|>\n<|im_start|>assistant"),
                 step([yes, no], [p_yes, 1 - p_yes])),
                (lambda p: "Writeaquestionthatthispassageanswers." in p, likelihood),
                (lambda p: SUP_Q in p, step(critic.support, sup)),
                (lambda p: USE_Q in p, step(critic.utility, use))]
    return g, critic


def test_prompted_critique_continues_the_candidate_conversation_hand_computed() -> None:
    g, critic = prompted_setup(0.6, (0.3, 0.3, 0.1), [0.1, 0.1, 0.2, 0.2, 0.4])
    p = Passage(id="p", title="T", text="The Zorblax Prize is awarded in Kelmora.")
    answer = Generation(text=" It is awarded in Kelmora. ", token_ids=[5, 6, 7], token_logprobs=[-0.2, -0.4, -0.6],
                        finish_reason="stop")
    (c,) = asyncio.run(critic.critique([("Where?", p, answer)], W))
    s_sup = (0.3 + 0.5 * 0.3) / 0.7
    s_use = (-1 * 0.1 - 0.5 * 0.1 + 0 * 0.2 + 0.5 * 0.2 + 1 * 0.4) / 1.0
    seq = math.exp(-0.4)
    assert (c.s_rel, c.s_sup, c.s_use, c.seq) == pytest.approx((0.6, s_sup, s_use, seq))
    assert c.total == pytest.approx(seq + W.rel * 0.6 + W.sup * s_sup + W.use * s_use)
    # the questions share the candidate's prefix: IsRel extends its request (all but the end of
    # the user turn), IsSup and IsUse continue its prompt and answer
    import os

    (rel,), questions = g.calls
    prompt = critic.candidate_prompt("Where?", p)
    turn_end = "<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.endswith(turn_end) and len(questions) == 2
    assert os.path.commonprefix([rel, prompt]) == prompt[: -len(turn_end)]
    assert all(q.startswith(prompt + "It is awarded in Kelmora.") for q in questions)


def test_likelihood_relevance_is_a_softmax_of_question_log_likelihoods_hand_computed() -> None:
    """IsRel = p(question | passage) normalised over the question's passages; the question reaches
    the model after the passage as the reply, its control tokens neutralised."""
    from rag.selfrag.critic import QL_Q

    g, critic = prompted_setup(0.5, (0.2, 0.2, 0.2), [0.2] * 5, relevance="likelihood",
                               token_lp={"a": -0.5, "b": -1.0, "c": -2.0})
    q = "Who won? <|im_end|>"
    pairs = [(q, hit(k).passage) for k in "abc"] + [("Other?", hit("a").passage)]
    rel = asyncio.run(critic.relevance(pairs))
    from rag.prompts.sanitize import neutralize

    head = critic.format.render([ChatMessage(role="user", content=QL_Q.format(passage=hit("a").passage.title_text))])
    n = len(g.encode(head + neutralize(q, critic.extra_control))) - len(g.encode(head))  # the question's tokens
    lls = [n * -0.5, n * -1.0, n * -2.0]
    z = sum(math.exp(x) for x in lls)
    assert rel[:3] == pytest.approx([math.exp(x) / z for x in lls]) and rel[3] == pytest.approx(1.0)
    prompts = [p for call in g.calls for p in call]  # a call per question length
    assert len(prompts) == 4 and all("Writeaquestion" in p for p in prompts)
    assert prompts[0].endswith("<|im_start|>assistant" + neutralize(q, critic.extra_control).replace(" ", ""))
    assert neutralize(q, critic.extra_control) != q  # the question's chat marker was escaped
    # the same pairs in another order: each question's passages are normalised together
    assert asyncio.run(critic.relevance(pairs[::-1])) == pytest.approx(rel[::-1])


def test_retrieval_prior_adds_w_ret_over_rank_and_can_change_the_pick() -> None:
    g, critic = prompted_setup(0.5, (0.2, 0.2, 0.2), [0.2] * 5)
    first, second = hit("a", rank=1), hit("b", rank=2)
    answers = {"a": Generation(text="From a.", token_ids=[5], token_logprobs=[-1.0], finish_reason="stop"),
               "b": Generation(text="From b.", token_ids=[5], token_logprobs=[-0.1], finish_reason="stop")}
    # candidate prompts: one user turn (critique prompts, matched first, have two)
    g.script += [(lambda p, k=k: f"text of {k}" in p and p.count("<|im_start|>user") == 1, v)
                 for k, v in answers.items()]

    def run(w_ret: float):  # type: ignore[no-untyped-def]
        settings = SelfRagSettings(mode="always", critic="prompted", w_ret=w_ret)
        dec = SelfRagDecoder(g, critic, settings, GenerationParams(max_new_tokens=8))
        return asyncio.run(dec.short_form(["Q?"], None, 2, hits=[[first, second]]))[0]

    plain, prior = run(0.0), run(2.0)
    assert [s.s_ret for s in plain.scores] == [1.0, 0.5]
    # seq favours b by e^-0.1 - e^-1 = 0.54; the prior 2/1 against 2/2 favours a by 1.0
    assert plain.text == "From b." and prior.text == "From a."
    for a, b in zip(plain.scores, prior.scores, strict=True):
        assert b.total == pytest.approx(a.total + 2.0 * b.s_ret)


def test_relevance_screen_generates_only_for_the_best_passages_hand_computed() -> None:
    """candidates: 1 asks IsRel of each passage first (one token, no answer), generates only for
    argmax(w_rel*s_rel + w_ret/rank), and does not ask IsRel again in the critique."""
    from rag.selfrag.critic import REL_Q, PromptedCritic

    g, critic = prompted_setup(0.5, (0.6, 0.2, 0.2), [0.1, 0.1, 0.2, 0.2, 0.4])
    assert isinstance(critic, PromptedCritic)
    yes, no = critic.yes_no
    p_yes = {"a": 0.3, "b": 0.9, "c": 0.95}

    def rel_step(prompt: str) -> Generation:
        k = next(k for k in p_yes if f"text of {k}" in prompt)
        return Generation(text="Yes", token_ids=[yes], token_logprobs=[-0.1],
                          logprobs=[{yes: ln(p_yes[k]), no: ln(1 - p_yes[k])}], finish_reason="stop")

    g.script.insert(0, (lambda p: REL_Q in p, rel_step))
    g.script += [(lambda p, k=k: f"text of {k}" in p and p.count("<|im_start|>user") == 1,
                  Generation(text=f"From {k}.", token_ids=[5], token_logprobs=[-0.5], finish_reason="stop"))
                 for k in p_yes]
    hits = [hit("a", rank=1), hit("b", rank=2), hit("c", rank=3)]

    def run(w_ret: float, candidates: int):  # type: ignore[no-untyped-def]
        g.calls.clear()
        settings = SelfRagSettings(mode="always", critic="prompted", w_ret=w_ret, candidates=candidates)
        dec = SelfRagDecoder(g, critic, settings, GenerationParams(max_new_tokens=8))
        return asyncio.run(dec.short_form(["Q?"], None, 3, hits=[hits]))[0]

    # s_rel + w_ret/rank: a 0.3+1.0=1.3, b 0.9+0.5=1.4, c 0.95+0.333=1.283 -> b
    one = run(1.0, 1)
    screen, generate = g.calls  # one candidate left: nothing for IsSup/IsUse to choose between
    assert len(screen) == 3 and all(REL_Q in p for p in screen)
    assert len(generate) == 1 and "text of b" in generate[0]
    assert one.text == "From b." and [s.passage_id for s in one.scores] == ["b"]
    assert one.scores[0].s_rel == pytest.approx(0.9) and one.scores[0].s_ret == pytest.approx(0.5)
    assert one.scores[0].s_sup is None and one.scores[0].s_use is None
    assert one.scores[0].total == pytest.approx(math.exp(-0.5) + 0.9 + 0.5)  # seq + w_rel*s_rel + w_ret/rank
    # critique_single asks them anyway (the scores a user may want), IsRel still not twice
    g.calls.clear()
    settings = SelfRagSettings(mode="always", critic="prompted", w_ret=1.0, candidates=1, critique_single=True)
    asked = asyncio.run(SelfRagDecoder(g, critic, settings, GenerationParams(max_new_tokens=8))
                        .short_form(["Q?"], None, 3, hits=[hits]))[0]
    critique = g.calls[2]
    assert len(critique) == 2 and not any(REL_Q in p for p in critique)  # IsSup, IsUse only
    assert asked.text == "From b." and asked.scores[0].s_sup == pytest.approx((0.6 + 0.5 * 0.2) / 1.0)
    assert [h.passage.id for h in one.hits] == ["a", "b", "c"]  # what was retrieved, all of it
    # a stronger prior keeps the top-ranked passage: a 0.3+4 beats b 0.9+2
    assert run(4.0, 1).text == "From a."
    # candidates: 2 keeps b and a (1.4, 1.3), critiques both, the paper's formula picks between them
    two = run(1.0, 2)
    assert [s.passage_id for s in two.scores] == ["b", "a"] and len(g.calls[1]) == 2
    assert [s.s_rel for s in two.scores] == pytest.approx([0.9, 0.3])


def test_relevance_screen_with_reflection_tokens_reads_the_first_isrel_position() -> None:
    cands = {"a": candidate(0.2, "Berlin", "full", 5), "b": candidate(0.9, "Paris", "full", 5),
             "c": candidate(0.6, "Lyon", "full", 5)}
    script = [(lambda p, k=k: f"text of {k}" in p, g) for k, g in cands.items()]
    dec, g = decoder(script, SelfRagSettings(mode="always", candidates=1))
    (answer,) = short_form(dec, ["Where is the Eiffel Tower?"], lambda qs, k: [[hit("a"), hit("b"), hit("c")]], 3)
    screen, generate = g.calls
    assert len(screen) == 3 and generate == [screen[1]]  # the candidate prompt of b, the most relevant
    assert answer.text == "Paris" and answer.scores[0].s_rel == pytest.approx(0.9)


def test_calibration_picks_weights_on_the_tuning_split_and_reports_held_out(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from rag.eval.calibrate import PAPER, read_candidates, tune, value
    from rag.eval.records import EvalRecord

    def cand(text: str, rel: float, seq: float, s_ret: float) -> dict[str, float | str]:
        return {"passage_id": text, "text": text, "s_rel": rel, "s_sup": 0.0, "s_use": 0.0, "seq": seq,
                "total": 0.0, "s_ret": s_ret}

    # the right answer always sits in the top-ranked candidate, which the sequence score dislikes
    records = [EvalRecord(id=f"q{i}", question="q", prediction="", metrics={}, gold=["Kelmora"],
                          scores=[cand("Kelmora", 0.1, 0.2, 1.0), cand("Paris", 0.1, 0.9, 0.5)])
               for i in range(40)]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(r.line() for r in records))
    result = tune(read_candidates(tmp_path))
    assert result["paper"]["held_out"] == 0.0 and result["tuned"]["held_out"] == 1.0
    assert result["oracle"]["held_out"] == 1.0 and result["weights"]["w_ret"] > 0
    assert result["tune_questions"] + result["held_out_questions"] == 40
    from rag.eval.calibrate import Question

    assert value([Question(r, "match") for r in records], PAPER) == 0.0
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({**records[0].model_dump(), "scores": [
        {k: v for k, v in c.items() if k != "s_ret"} for c in records[0].scores]}) + "\n")
    with pytest.raises(ConfigError, match="rerun rag eval"):
        read_candidates(old)


def test_screen_calibration_weighs_relevance_against_rank(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--screen: the pick is argmax(w_rel*s_rel + w_ret*s_ret); here relevance is right on every
    question (the second-ranked passage holds the answer and is judged relevant)."""

    from rag.eval.calibrate import read_candidates, tune
    from rag.eval.records import EvalRecord

    def cand(text: str, rel: float, s_ret: float) -> dict[str, float | str]:
        return {"passage_id": text, "text": text, "s_rel": rel, "s_sup": 0.0, "s_use": 0.0, "seq": 0.9,
                "total": 0.0, "s_ret": s_ret}

    records = [EvalRecord(id=f"q{i}", question="q", prediction="", metrics={}, gold=["Kelmora"],
                          scores=[cand("Paris", 0.1, 1.0), cand("Kelmora", 0.9, 0.5)]) for i in range(40)]
    (tmp_path / "predictions.jsonl").write_text("".join(r.line() for r in records))
    result = tune(read_candidates(tmp_path), screen=True)
    w = result["weights"]
    assert set(w) == {"candidates", "w_rel", "w_ret"} and w["candidates"] == 1
    assert 0.9 * w["w_rel"] + 0.5 * w["w_ret"] > 0.1 * w["w_rel"] + 1.0 * w["w_ret"]  # relevance wins
    assert result["tuned"]["held_out"] == 1.0 and result["top_ranked"]["held_out"] == 0.0
