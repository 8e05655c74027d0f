"""Remote backend ``openai``: generation on any OpenAI-compatible server through the official
``openai`` client (``/v1/completions``): ``vllm serve`` (tensor-parallel, on a Ray cluster), another
``rag serve``, llama.cpp's server, a hosted API.

Prompts are rendered and tokenized here, with the model's own tokenizer (a local folder or a
packaged model: ``tokenizer``, by default the model name), and sent as token ids, so the server
sees exactly the ids an in-process engine would (BOS once, control tokens neutralised before).

Exact logprobs of given token ids (reflection tokens, critique options) use vLLM's request
extension ``logprob_token_ids``; `load` probes whether the server honours it
(``exact_token_logprobs``). Without it the prompted critic reads the options from the top-k
logprobs (an option outside the top k counts as missing), and the reflection-token critic
refuses to start (`rag.selfrag.critic.TokenCritic`).

The client lives on its own event loop in one thread, like the vLLM engine: requests from any
thread or loop are scheduled there. The client retries timeouts, connection errors and
408/409/429/5xx (``max_retries``); what still fails, and a server that goes away mid-stream,
ends in a `GenerationError` that names the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from rag.errors import ConfigError, GenerationError, PromptError, RagError, missing_extra
from rag.generation import LoopThread, Prompt, TokenizerOps
from rag.models import resolve_model
from rag.types import Generation, GenerationChunk, GenerationParams

log = logging.getLogger(__name__)

TOKEN_ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids keys
MISSING_LOGPROB = -100.0  # a requested token the server did not return (as rag.selfrag.scoring)


class OpenAIGenerator(TokenizerOps):
    """Generation on an OpenAI-compatible server.

    Args:
        model: the model name the server serves.
        base_url: the server's API root (``http://host:8000/v1``).
        api_key_env: the environment variable holding the key (never the key itself);
            unset: no key (``EMPTY``, as vLLM expects).
        tokenizer: local tokenizer folder or packaged model name (default: ``model``).
        timeout_s: per-request timeout; max_retries: the client's retries.
        top_logprobs_cap: the most top-k logprobs the server returns (vLLM's default 20;
            OpenAI's API 5), used when the server lacks ``logprob_token_ids``.
    """

    def __init__(self, model: str, *, base_url: str, api_key_env: str | None = None,
                 tokenizer: str | None = None, timeout_s: float = 120.0, max_retries: int = 2,
                 top_logprobs_cap: int = 20):
        if not base_url:
            raise ConfigError("generator.base_url is required for backend openai (e.g. http://127.0.0.1:8000/v1)")
        self.model_name = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.tokenizer_name = tokenizer or model
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.top_logprobs_cap = top_logprobs_cap
        self.exact_token_logprobs: bool | None = None  # known after load()
        self._extensions = True  # vLLM's request fields; off for a server that refuses them
        self._client: Any = None
        self._runner: LoopThread | None = None  # the client's loop
        self._tok_lock = threading.Lock()
        self._load_lock = threading.Lock()

    _tokenizer: Any = None

    # --- life cycle ----------------------------------------------------------------------------

    def load(self) -> OpenAIGenerator:
        with self._load_lock:
            if self._client is None:
                self._start()
        return self

    def _start(self) -> None:
        try:
            import openai
            from transformers import AutoTokenizer
        except ImportError:
            raise missing_extra("openai", "remote") from None
        key = "EMPTY"
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            if not key:
                raise ConfigError(f"generator.api_key_env names {self.api_key_env}, which is not set; "
                                  f"export {self.api_key_env}=<the server's key>")
        try:
            path = resolve_model(self.tokenizer_name)
            self._tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise ConfigError(f"backend openai needs the model's tokenizer here; {self.tokenizer_name!r} "
                              f"could not be loaded ({e}); set generator.tokenizer to a local folder "
                              "holding the model's tokenizer files") from None
        runner = LoopThread("rag-openai-client")

        async def create() -> Any:
            return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout_s,
                                      max_retries=self.max_retries)

        client = runner.run(create())
        # the caller may hold _tok_lock (load() runs from the tokenizer ops): no encode() here
        probe_ids = list(self._tokenizer("a")["input_ids"])
        try:
            exact = runner.run(self._probe(client, probe_ids))
        except BaseException:
            _stop(client, runner)
            raise
        self._client, self._runner = client, runner
        self.exact_token_logprobs = exact
        self.structured_outputs = bool(self._extensions)  # a vLLM server honours response_format

    async def _probe(self, client: Any, ids: list[int]) -> bool:
        """Whether the server returns logprobs of requested token ids; also checks that it is
        there and serves the model. A server that refuses vLLM's extension fields (400) is sent
        plain OpenAI requests from then on."""
        wanted = sorted({ids[-1], (ids[-1] + 1) % len(self._tokenizer)})
        try:
            r = await client.completions.create(**self._body(ids, GenerationParams(
                max_new_tokens=1, logprob_token_ids=wanted)))
        except Exception as e:
            if _status(e) not in (400, 422):
                raise self._error(e) from None
            self._extensions = False
            await self._call(client.completions.create(**self._body(ids, GenerationParams(max_new_tokens=1))))
            return False
        steps = _top(r.choices[0])
        return bool(steps) and all(f"{TOKEN_ID_PREFIX}{i}" in steps[0] for i in wanted)

    def close(self) -> None:
        with self._load_lock:
            client, runner = self._client, self._runner
            self._client, self._runner = None, None
        if client is not None and runner is not None:
            _stop(client, runner)

    def _tok(self) -> Any:
        if self._tokenizer is None:
            self.load()
        return self._tokenizer

    # --- requests ----------------------------------------------------------------------------

    def _body(self, ids: list[int], params: GenerationParams, *, stream: bool = False) -> dict[str, Any]:
        """The completions request: the prompt as token ids, vLLM's extensions in extra_body."""
        body: dict[str, Any] = {"model": self.model_name, "prompt": ids, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p, "stream": stream}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = params.stop
        extra: dict[str, Any] = {}
        extensions = self._extensions
        if extensions:
            extra = {"skip_special_tokens": False, "spaces_between_special_tokens": False,
                     "return_tokens_as_token_ids": True, "return_token_ids": True}
            if params.min_new_tokens:
                extra["min_tokens"] = params.min_new_tokens
            if params.top_k:
                extra["top_k"] = params.top_k
            if params.stop_token_ids:
                extra["stop_token_ids"] = params.stop_token_ids
            if params.prompt_logprobs and not stream:
                extra["prompt_logprobs"] = 0
        elif params.top_k and params.temperature > 0:
            raise GenerationError(f"the generator server {self.base_url} refuses vLLM's request fields, so it "
                                  f"cannot sample with top_k={params.top_k}; use top_p (or temperature 0)")
        if stream:
            body["stream_options"] = {"include_usage": True}
        elif params.logprob_token_ids and extensions and self.exact_token_logprobs is not False:
            body["logprobs"] = 1
            extra["logprob_token_ids"] = params.logprob_token_ids
        elif params.logprob_token_ids:
            body["logprobs"] = self.top_logprobs_cap  # the options, when they are in the top k
        else:
            body["logprobs"] = max(params.top_logprobs, 1)
        if params.json_schema is not None:  # not an argument of the SDK's completions.create
            extra["response_format"] = {"type": "json_schema",
                                        "json_schema": {"name": "output", "schema": params.json_schema}}
        elif params.json_object:
            extra["response_format"] = {"type": "json_object"}
        if extra:
            body["extra_body"] = extra
        return body

    def _error(self, e: BaseException) -> RagError:
        import openai

        where = f"the generator server {self.base_url}"
        if isinstance(e, openai.BadRequestError):  # the request's own fault (a prompt over its context...)
            return PromptError(f"{where} refused the request: {_message(e)}")
        if isinstance(e, openai.APITimeoutError):
            return GenerationError(f"{where} did not answer within {self.timeout_s:g}s "
                                   "(generator.timeout_s)")
        if isinstance(e, openai.APIConnectionError):
            return GenerationError(f"could not reach or lost the connection to {where} ({e.__cause__ or e}); "
                                   "is it running?")
        if isinstance(e, openai.NotFoundError):
            return GenerationError(f"{where} does not serve model {self.model_name!r} or has no "
                                   f"/v1/completions route: {_message(e)}")
        if isinstance(e, openai.APIStatusError):
            return GenerationError(f"{where} answered {e.status_code}: {_message(e)}")
        return GenerationError(f"{where} failed: {e}")

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except RagError:
            raise
        except Exception as e:
            raise self._error(e) from None

    def _generation(self, choice: Any, usage: Any, ids_in: list[int], params: GenerationParams) -> Generation:
        steps = _top(choice)
        lp = getattr(choice, "logprobs", None)
        token_lp = [float("nan") if x is None else float(x) for x in (getattr(lp, "token_logprobs", None) or [])]
        ids = (choice.model_extra or {}).get("token_ids")
        if ids is None:  # a server without return_token_ids: the ids its tokens name, or re-encoded text
            tokens = getattr(lp, "tokens", None) or []
            ids = ([int(t[len(TOKEN_ID_PREFIX):]) for t in tokens]
                   if tokens and all(t.startswith(TOKEN_ID_PREFIX) for t in tokens)
                   else self._tok().encode(choice.text, add_special_tokens=False))
        wanted = params.logprob_token_ids
        keyed = [self._keyed(s) for s in steps]
        if wanted and self.exact_token_logprobs and any(any(i not in k for i in wanted) for k in keyed):
            raise GenerationError(f"{self.base_url} returned no logprobs for some requested token ids "
                                  "(logprob_token_ids)")
        req = [{i: k.get(i, MISSING_LOGPROB) for i in wanted} for k in keyed] if wanted else []
        top = keyed if params.top_logprobs and not wanted else []
        finish = "length" if choice.finish_reason == "length" else "stop"
        prompt_tokens = getattr(usage, "prompt_tokens", None) or len(ids_in)
        return Generation(text=choice.text, token_ids=list(ids), token_logprobs=token_lp, logprobs=req,
                          top_logprobs=top, finish_reason=finish, prompt_tokens=prompt_tokens,
                          prompt_logprobs=(self._prompt_logprobs(choice, ids_in)[-params.prompt_logprobs_tail:]
                                           if params.prompt_logprobs else []))

    def _prompt_logprobs(self, choice: Any, ids_in: list[int]) -> list[float]:
        """vLLM's ``prompt_logprobs`` (a dict per prompt position, keyed by token id) for ours."""
        steps = (choice.model_extra or {}).get("prompt_logprobs")
        if not steps or len(steps) != len(ids_in):
            raise GenerationError(f"{self.base_url} returned no prompt_logprobs (a vLLM extension); the "
                                  "prompted critic's relevance needs them: serve the model with vllm serve or "
                                  "rag serve, or set selfrag.relevance: question")
        out = []
        for tid, step in zip(ids_in[1:], steps[1:], strict=True):
            entry = {int(str(k).removeprefix(TOKEN_ID_PREFIX)): v for k, v in step.items()}[tid]
            out.append(float(entry["logprob"] if isinstance(entry, dict) else entry))
        return out

    def _keyed(self, step: dict[str, float]) -> dict[int, float]:
        """A top-logprobs step by token id ("token_id:N" keys, else the token's text)."""
        out: dict[int, float] = {}
        for key, value in step.items():
            if key.startswith(TOKEN_ID_PREFIX):
                out[int(key[len(TOKEN_ID_PREFIX):])] = float(value)
            else:
                with self._tok_lock:
                    ids = self._tok().encode(key, add_special_tokens=False)
                if len(ids) == 1:
                    out.setdefault(ids[0], float(value))
        return out

    def _client_loop(self) -> LoopThread:
        self.load()
        assert self._runner is not None
        return self._runner

    async def agenerate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """One request per prompt, all in flight together (the server batches them)."""
        if not prompts:
            return []
        runner = self._client_loop()
        ids = [self.prompt_ids(p) for p in prompts]

        async def one(i: list[int]) -> Generation:
            r = await self._call(self._client.completions.create(**self._body(i, params)))
            return self._generation(r.choices[0], r.usage, i, params)

        async def run_all() -> list[Generation]:
            return list(await asyncio.gather(*(one(i) for i in ids)))

        return await runner.call(run_all())

    async def stream(self, prompt: Prompt, params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        """Text deltas as the server sends them; closing the iteration closes the connection,
        which makes vLLM abort the request."""
        runner = self._client_loop()
        ids = self.prompt_ids(prompt)

        async def pump(put: Callable[[Any], None]) -> None:  # on the client loop
            n, final = 0, None
            try:
                stream = await self._call(self._client.completions.create(**self._body(ids, params, stream=True)))
                async with stream:
                    async for chunk in stream:
                        if chunk.usage is not None:  # the last chunk, after the finish reason
                            n = chunk.usage.completion_tokens
                        for choice in chunk.choices:
                            n += len((choice.model_extra or {}).get("token_ids") or ()) or int(bool(choice.text))
                            if choice.finish_reason is not None:
                                final = (choice.text, "length" if choice.finish_reason == "length" else "stop")
                            elif choice.text:
                                put(GenerationChunk(text=choice.text, completion_tokens=n, prompt_tokens=len(ids)))
                if final is None:
                    raise GenerationError(f"the generator server {self.base_url} ended the stream "
                                          "before its last token")
                put(GenerationChunk(text=final[0], completion_tokens=n, prompt_tokens=len(ids),
                                    finish_reason=final[1]))
            except asyncio.CancelledError:
                raise
            except RagError as e:
                put(e)
            except Exception as e:
                put(self._error(e))

        async for chunk in runner.relay(pump):
            yield chunk


def _stop(client: Any, runner: LoopThread) -> None:
    """Close the client's connections on its loop, then stop the loop and its thread."""
    try:
        runner.run(client.close(), timeout=5)
    except Exception as e:
        log.debug("openai client close: %s", e)
    runner.stop(timeout=5)


def _top(choice: Any) -> list[dict[str, float]]:
    lp = getattr(choice, "logprobs", None)
    return [s or {} for s in (getattr(lp, "top_logprobs", None) or [])]


def _status(e: BaseException) -> int | None:
    return getattr(e, "status_code", None)


def _message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("message"):
            return str(body["message"])
    return str(getattr(e, "message", e))
