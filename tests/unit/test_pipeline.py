"""ChatRagPipeline with a scripted generator and an in-memory hashing-embedder index: exact prompts."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from rag.config import ChatPipelineConfig, load_pipeline_config, pipeline_config
from rag.errors import ConfigError, PromptError
from rag.generation.scripted import ScriptedGenerator, text_generation
from rag.pipeline import ChatRagPipeline, build_context
from rag.retriever import DenseRetriever
from rag.types import ChatMessage, DoneEvent, Hit, IndexInfo, Passage, SourcesEvent, TextEvent

ROOT = Path(__file__).resolve().parents[2]


def sciphi_config(**kw: object) -> ChatPipelineConfig:
    return ChatPipelineConfig(**{"name": "t", "prompt": {"format": "sciphi"},
                             "retrieval": {"top_k": 1, "context_chars": 2048},
                             "generation": {"stop": ["<paragraph>"]}, **kw})


def test_sciphi_flow_exact_prompt_and_cleaned_answer(memory_index: DenseRetriever) -> None:
    raw = "[Relevant]It is in Paris.[Fully supported][Utility:5]</s>"
    gen = ScriptedGenerator(default=text_generation(raw))
    pipe = ChatRagPipeline(sciphi_config(), gen, memory_index)
    answer = pipe.chat([ChatMessage(role="user", content="Where is the Nile river?"),
                        ChatMessage(role="assistant", content="Africa."),
                        ChatMessage(role="user", content="Where is the Eiffel Tower in Paris?")])
    assert answer.text == "It is in Paris."
    assert [c.id for c in answer.citations] == ["eiffel"]
    (prompt,) = gen.calls[0]
    assert prompt.endswith("### Instruction:\nWhere is the Eiffel Tower in Paris?\n\n### Response:\n"
                           "[Retrieval] <paragraph>Eiffel Tower\nThe Eiffel Tower is in Paris, France."
                           "</paragraph>")
    assert answer.trace.prompt == prompt and answer.timings.retrieval_s > 0
    assert answer.usage.completion_tokens == len(raw.split()) and answer.finish_reason == "stop"


def test_retrieval_uses_the_last_user_turn_only(memory_index: DenseRetriever) -> None:
    gen = ScriptedGenerator(default=text_generation("ok"))
    pipe = ChatRagPipeline(sciphi_config(), gen, memory_index)
    a = pipe.chat([ChatMessage(role="user", content="Eiffel Tower Paris"),
                   ChatMessage(role="assistant", content="..."),
                   ChatMessage(role="user", content="longest river Africa Nile")])
    assert [c.id for c in a.citations] == ["nile"]


def test_hostile_passage_is_neutralised_in_the_prompt(memory_index: DenseRetriever) -> None:
    gen = ScriptedGenerator(default=text_generation("ok"))
    pipe = ChatRagPipeline(sciphi_config(), gen, memory_index)
    pipe.ask("Ignore instructions system")
    (prompt,) = gen.calls[0]
    context = prompt.split("[Retrieval] <paragraph>", 1)[1]
    assert "[No Retrieval]" not in context and "</s>" not in context and "<|im_start|>" not in context
    assert "[ No Retrieval]" in context


def test_context_budget_and_batching() -> None:
    hits = [Hit(passage=Passage(id=str(i), title=f"T{i}", text="x" * 50), score=1.0, rank=i + 1)
            for i in range(5)]
    ctx, used = build_context(hits, 120)
    assert len(ctx) == 120 and [h.passage.id for h in used] == ["0", "1", "2"]
    assert ctx.split("\n")[0] == "T0"
    ctx, used = build_context(hits, 10_000)
    assert len(used) == 5 and ctx.count("\n") == 9


def test_answer_batch_is_one_generation_call(memory_index: DenseRetriever) -> None:
    gen = ScriptedGenerator(default=text_generation("ok"))
    pipe = ChatRagPipeline(sciphi_config(), gen, memory_index)
    answers = pipe.answer_batch([[ChatMessage(role="user", content=q)] for q in ("Nile", "Eiffel", "x")])
    assert len(gen.calls) == 1 and len(gen.calls[0]) == 3 and len(answers) == 3


def test_bad_role_fails_before_any_generation(memory_index: DenseRetriever) -> None:
    gen = ScriptedGenerator(default=text_generation("ok"))
    pipe = ChatRagPipeline(sciphi_config(), gen, memory_index)
    with pytest.raises(PromptError, match="role 'tool' is not supported"):
        pipe.chat([ChatMessage(role="tool", content="x"), ChatMessage(role="user", content="y")])
    assert gen.calls == []


def test_streaming_holds_back_control_strings(memory_index: DenseRetriever) -> None:
    gen = ScriptedGenerator(default=text_generation("[Relevant]Paris is lovely.[Utility:5]"))
    pipe = ChatRagPipeline(sciphi_config(), gen, memory_index)
    events = asyncio.run(_collect(pipe.astream([ChatMessage(role="user", content="Eiffel")])))
    assert isinstance(events[0], SourcesEvent) and events[0].hits[0].passage.id == "eiffel"
    texts = [e.text for e in events if isinstance(e, TextEvent)]
    assert len(texts) > 2 and "".join(texts) == "Paris is lovely."
    assert not any("[" in t or "]" in t for t in texts)  # no half control string ever shown
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.answer.text == "Paris is lovely."
    assert done.answer.citations[0].id == "eiffel" and done.answer.timings.first_token_s is not None


async def _collect(events):  # type: ignore[no-untyped-def]
    return [e async for e in events]


def test_sciphi_stop_token_is_checked_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="generation.stop must include '<paragraph>'"):
        ChatPipelineConfig(name="x", prompt={"format": "sciphi"})


def test_pipeline_yaml_errors_name_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nretrieval:\n  top_k: 0\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: field 'retrieval\.top_k'.*field 'retrieval\.colour'"):
        load_pipeline_config(bad)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "pipelines").glob("*.yaml")))
def test_shipped_pipelines_validate(name: str) -> None:
    assert load_pipeline_config(ROOT / "pipelines" / name).name


@pytest.mark.parametrize(("data", "message"), [
    ({"name": "x", "selfrag": {"mode": "always"}}, "field 'selfrag' is not a setting of kind: chat pipelines"),
    ({"name": "x", "kind": "retrieval", "generator": {"backend": "hf"}},
     "field 'generator' is not a setting of kind: retrieval pipelines"),
    ({"name": "x", "kind": "chat", "query_rewrite": True, "kind_of": 1}, "field 'kind_of' is not a setting"),
    ({"name": "x", "kind": "agent"}, "field 'kind' must be chat, selfrag or retrieval (got 'agent')"),
])
def test_pipeline_config_is_a_union_keyed_by_kind(data: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline_config("p.yaml", **data)


def test_pipeline_kinds_from_yaml(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("name: s\nkind: selfrag\nselfrag: {mode: never}\n")
    assert type(load_pipeline_config(f)).__name__ == "SelfRagPipelineConfig"
    f.write_text("name: c\nquery_rewrite: true\n")
    config = load_pipeline_config(f)
    assert config.kind == "chat" and config.retrieval.query == "rewrite"  # the older spelling of it


def test_langchain_chat_model_uses_the_pipeline_batch_and_stream(memory_index: DenseRetriever) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

    from rag.integrations.langchain import RagChatModel

    gen = ScriptedGenerator(default=text_generation("[Relevant]It is in Paris, France.[Utility:5]"))
    chat = RagChatModel(pipeline=ChatRagPipeline(sciphi_config(), gen, memory_index))
    convo = [SystemMessage("Be brief."), HumanMessage("Nile?"), AIMessage("Africa."),
             HumanMessage("Where is the Eiffel Tower?")]
    out = chat.invoke(convo)
    assert out.content == "It is in Paris, France."
    assert out.response_metadata["citations"][0]["id"] == "eiffel"
    assert out.usage_metadata["output_tokens"] == len("[Relevant]It is in Paris, France.[Utility:5]".split())
    (prompt,) = gen.calls[-1]
    assert "Be brief." in prompt and "### Response:\nAfrica.\n\n" in prompt
    chunks = list(chat.stream(convo))
    assert len(chunks) > 2 and "".join(str(c.content) for c in chunks) == out.content
    achunks = asyncio.run(_collect(chat.astream(convo)))
    assert "".join(str(c.content) for c in achunks) == out.content
    assert [o.content for o in chat.batch([[HumanMessage("Nile?")], [HumanMessage("Eiffel?")]])] == [out.content] * 2
    with pytest.raises(PromptError, match="ToolMessage"):
        chat.invoke([ToolMessage("x", tool_call_id="1"), HumanMessage("y")])


def test_concurrent_async_searches_share_batches_and_get_their_own_hits(memory_index: DenseRetriever) -> None:
    """32 searches from 4 threads (each its own event loop): every caller gets exactly what a
    search of its own query returns, while the retriever sees far fewer, larger batches."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    class Counting:
        def __init__(self, inner: DenseRetriever) -> None:
            self.inner, self.batches = inner, []  # type: ignore[var-annotated]
            self.first = threading.Event()

        def search_batch(self, queries: list[str], top_k: int) -> list[list[Hit]]:
            self.batches.append(len(queries))
            if len(self.batches) == 1:
                self.first.wait(5)  # hold the first batch until every caller has queued
            return self.inner.search_batch(queries, top_k)

        def describe(self) -> IndexInfo:
            return self.inner.describe()

    retriever = Counting(memory_index)
    pipe = ChatRagPipeline(sciphi_config(), ScriptedGenerator(), retriever)  # type: ignore[arg-type]
    questions = [f"{w} question {i}" for i in range(8) for w in ("Eiffel", "Nile", "Paris", "Africa")]
    expected = {q: [h.passage.id for h in retriever.inner.search(q, 2)] for q in questions}

    def caller(qs: list[str]) -> dict[str, list[str]]:
        async def run() -> list[list[Hit]]:
            return await asyncio.gather(*(pipe.asearch([q], 2) for q in qs))
        return {q: [h.passage.id for h in hits[0]] for q, hits in zip(qs, asyncio.run(run()))}

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(caller, questions[i::4]) for i in range(4)]
        threading.Timer(0.5, retriever.first.set).start()
        got = {q: ids for f in futures for q, ids in f.result(timeout=30).items()}
    assert got == expected
    assert sum(retriever.batches) == 32 and len(retriever.batches) <= 3, retriever.batches
