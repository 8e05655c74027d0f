"""transformers backend: batched generation with full logits (exact requested-id logprobs).

One worker thread owns the model. Every request - a batch call's prompts or one stream - is a
*row* on the worker's queue; the worker waits ``batch_wait_s`` for concurrent rows to join, then
runs up to ``batch_size`` rows with equal generation settings in one ``model.generate`` call.
Streaming rows get their text token by token from the same batched call; a cancelled row (its
caller went away or was cancelled) stops at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rag.errors import ConfigError, GenerationError, PromptError, missing_extra
from rag.generation import Prompt, TokenizerOps, drain, stream_visible
from rag.models import resolve_model
from rag.types import Generation, GenerationChunk, GenerationParams

log = logging.getLogger(__name__)


def _dtype(torch: Any, name: str, device: str) -> Any:
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


@dataclass(eq=False)
class _Row:
    """One prompt on the worker's queue; results go back to the caller's event loop."""

    ids: list[int]
    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Generation] | None = None  # batch rows: the result
    sink: asyncio.Queue[GenerationChunk | BaseException] | None = None  # streaming rows: the chunks
    cancelled: threading.Event = field(default_factory=threading.Event)
    # streaming state (worker thread only)
    new_ids: list[int] = field(default_factory=list)
    shown: int = 0
    finished: bool = False

    def send(self, fn: Any, *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the caller's loop is gone: nobody is waiting any more
            self.cancelled.set()

    def resolve(self, gen: Generation | None = None, error: BaseException | None = None) -> None:
        """Hand the outcome over: the future's result or error, or a stream's error."""
        if self.sink is not None:
            if error is not None:
                self.send(self.sink.put_nowait, error)
            return
        future = self.future
        assert future is not None

        def apply() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(gen)  # type: ignore[arg-type]
        self.send(apply)


_STOP = object()


class TransformersGenerator(TokenizerOps):
    """Generation through ``transformers`` (CPU or CUDA).

    Args:
        model: packaged name, local folder or cached hub id (see `rag.models.resolve_model`).
        device: ``auto`` | ``cpu`` | ``cuda``.
        dtype: ``auto`` (fp32 on CPU, bf16 on CUDA) | ``float32`` | ``bfloat16`` | ``float16``.
        batch_size: rows per forward batch.
        batch_wait_s: how long the worker waits for concurrent requests to join a batch.
        max_model_len: context cap in tokens (prompt + new tokens; the model's own when None or
            larger): longer requests are refused before they hold the worker.
    """

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 16, batch_wait_s: float = 0.01, model_obj: Any = None,
                 tokenizer_obj: Any = None, max_model_len: int | None = None):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if batch_wait_s < 0:
            raise ConfigError(f"batch_wait_s must be >= 0, got {batch_wait_s}")
        self.model_name = model
        self.device_name = device
        self.dtype_name = dtype
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.max_model_len = max_model_len
        self._model, self._tokenizer = model_obj, tokenizer_obj
        self._tok_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._cancel_all = threading.Event()  # set by close: running rows stop at the next token

    def load(self) -> TransformersGenerator:
        with self._load_lock:
            if self._model is None:
                self._load_model()
            self._setup_tokenizer()
            if self._worker is None:
                self._cancel_all.clear()
                self._worker = threading.Thread(target=self._run, name="rag-hf-worker", daemon=True)
                self._worker.start()
        return self

    def _load_model(self) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise missing_extra("transformers", "cpu") from None
        from rag.embedding import quiet_transformers

        quiet_transformers()
        path = resolve_model(self.model_name)
        device = self.device_name
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(torch, self.dtype_name, device))
        self._model = model.to(device).eval()  # type: ignore[arg-type]

    def _setup_tokenizer(self) -> None:
        tok = self._tokenizer
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the worker thread (pending rows fail, running rows stop at their next token);
        the model stays loaded. Waits at most ``timeout_s`` for a forward step in progress (a
        daemon thread: it cannot keep the process alive). Idempotent."""
        worker, self._worker = self._worker, None
        if worker is not None:
            self._cancel_all.set()
            self._queue.put(_STOP)
            worker.join(timeout_s)

    def _tok(self) -> Any:
        if self._tokenizer is None:
            self.load()
        return self._tokenizer

    @property
    def model(self) -> Any:
        return self.load()._model

    # --- requests (any thread / event loop) -------------------------------------------------

    def alive(self) -> bool:
        """False once closed (until loaded again), or when the worker thread has died."""
        worker = self._worker
        return not self._cancel_all.is_set() and (worker is None or worker.is_alive())

    def limits(self) -> tuple[int, int]:
        model = self.model
        context = getattr(model.config, "max_position_embeddings", None) or self.max_model_len or 2048
        return (model.get_output_embeddings().weight.shape[0],
                min(context, self.max_model_len) if self.max_model_len else context)

    def _submit(self, prompt: Prompt, params: GenerationParams, *, stream: bool) -> _Row:
        self.load()
        vocab = self.limits()[0]
        bad = [i for i in params.logprob_token_ids + params.stop_token_ids if not 0 <= i < vocab]
        if bad:
            raise PromptError(f"token ids {bad} in logprob_token_ids/stop_token_ids are outside the "
                              f"vocabulary (0..{vocab - 1})")
        loop = asyncio.get_running_loop()
        row = _Row(self.checked_ids(prompt, params), params, loop, None if stream else loop.create_future(),
                   asyncio.Queue() if stream else None)
        self._queue.put(row)
        return row

    async def agenerate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """One completion per prompt; rows from concurrent callers share forward batches."""
        rows = [self._submit(p, params, stream=False) for p in prompts]
        try:
            return list(await asyncio.gather(*(r.future for r in rows if r.future is not None)))
        finally:
            for r in rows:
                r.cancelled.set()  # no-op for finished rows; stops the rest at the next token

    async def stream(self, prompt: Prompt, params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        """Text as it is generated; the last chunk carries the finish reason. Closing or
        cancelling the iteration stops the row at the next token."""
        row = self._submit(prompt, params, stream=True)
        assert row.sink is not None
        try:
            async for chunk in drain(row.sink):
                yield chunk
        finally:
            row.cancelled.set()

    # --- the worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        pending: deque[_Row] = deque()
        while True:
            if not pending:
                item = self._queue.get()
                if item is _STOP:
                    break
                pending.append(item)
            if len(pending) < self.batch_size and self.batch_wait_s:
                threading.Event().wait(self.batch_wait_s)  # let concurrent requests join
            stop = False
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                pending.append(item)
            if stop:
                break
            key = pending[0].params.model_dump_json()
            batch = [r for r in pending if r.params.model_dump_json() == key][: self.batch_size]
            for r in batch:
                pending.remove(r)
            batch = [r for r in batch if not r.cancelled.is_set()]
            if not batch:
                continue
            try:
                gens = self._generate_rows(batch)
            except Exception as e:  # every row of the batch gets the error
                err = e if isinstance(e, GenerationError) else GenerationError(f"generation failed: {e}")
                for r in batch:
                    r.resolve(error=err)
                continue
            for r, g in zip(batch, gens, strict=True):
                if r.sink is not None:
                    self._finish_stream(r, g)
                else:
                    r.resolve(g)
        for r in pending:
            r.resolve(error=GenerationError("the generator was closed"))

    def _eos_ids(self, params: GenerationParams) -> list[int]:
        ids = self._model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self._tokenizer.eos_token_id is not None and self._tokenizer.eos_token_id not in ids:
            ids.append(self._tokenizer.eos_token_id)
        return ids + [i for i in params.stop_token_ids if i not in ids]

    def _gen_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": params.max_new_tokens,
                              "min_new_tokens": params.min_new_tokens or None,
                              "eos_token_id": self._eos_ids(params),
                              "pad_token_id": self._tokenizer.pad_token_id}
        if params.temperature > 0:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def _generate_rows(self, rows: list[_Row]) -> list[Generation]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        model, params = self._model, rows[0].params
        pad = self._tokenizer.pad_token_id
        width = max(len(r.ids) for r in rows)
        input_ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in rows])
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows])
        eos = set(self._eos_ids(params))
        gen = self

        class _Rows(BaseStreamer):
            first = True

            def put(self, value: Any) -> None:
                if self.first:  # the prompt
                    self.first = False
                    return
                for r, tid in zip(rows, value.reshape(-1).tolist(), strict=True):
                    if not r.finished:
                        gen._step(r, tid, eos)

            def end(self) -> None:
                pass

        class _Cancelled(StoppingCriteria):
            """A row ends when cancelled, at shutdown, or once its new text holds a stop string
            (checked on the decoded tail, so a stop list costs no tables to build)."""

            def __call__(self, ids: Any, scores: Any, **kw: Any) -> Any:
                done = [r.cancelled.is_set() or gen._cancel_all.is_set() or
                        gen._hit_stop(ids[b, width:].tolist(), params.stop) for b, r in enumerate(rows)]
                return torch.tensor(done, device=ids.device)

        if params.seed is not None:
            torch.manual_seed(params.seed)
        streaming = any(r.sink is not None for r in rows)
        with torch.inference_mode():
            res = model.generate(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                                 **self._gen_kwargs(params), output_logits=True,
                                 return_dict_in_generate=True, streamer=_Rows() if streaming else None,
                                 stopping_criteria=StoppingCriteriaList([_Cancelled()]))
        new = res.sequences[:, width:]
        # raw (unprocessed) logits -> log-probabilities, like vLLM's default raw_logprobs
        logprobs = torch.stack(res.logits, dim=1).float().log_softmax(-1)  # (batch, steps, vocab)
        out = []
        for b, r in enumerate(rows):
            ids: list[int] = []
            finish = "length"
            for tid in new[b].tolist():
                ids.append(tid)
                if tid in eos:
                    finish = "stop"
                    break
            steps = logprobs[b, : len(ids)]
            token_lp = steps.gather(-1, torch.tensor(ids, device=steps.device)[:, None])[:, 0].tolist()
            req = []
            if params.logprob_token_ids:
                cols = steps[:, params.logprob_token_ids].tolist()
                req = [dict(zip(params.logprob_token_ids, row, strict=True)) for row in cols]
            top = []
            if params.top_logprobs:
                vals, idx = steps.topk(params.top_logprobs, dim=-1)
                top = [dict(zip(i_row, v_row, strict=True))
                       for i_row, v_row in zip(idx.tolist(), vals.tolist(), strict=True)]
            text_ids = ids[:-1] if finish == "stop" and ids[-1] in eos else ids
            text = self.decode(text_ids)
            cut, hit = stream_visible(text, params.stop, finished=True)
            prompt_lp, prompt_top = (self._prompt_logprobs(r.ids, params.prompt_logprobs_tail,
                                                           params.prompt_top_logprobs)
                                     if params.prompt_logprobs else ([], []))
            out.append(Generation(text=text[:cut], token_ids=ids, token_logprobs=token_lp, logprobs=req,
                                  top_logprobs=top, finish_reason="stop" if hit else finish,  # type: ignore[arg-type]
                                  prompt_tokens=len(r.ids), prompt_logprobs=prompt_lp, prompt_top_logprobs=prompt_top))
        return out

    def _hit_stop(self, new: list[int], stops: list[str]) -> bool:
        if not stops:
            return False
        longest = max(len(x) for x in stops)
        text = self.decode(new[-(longest + 8):])  # a stop string spans at most its length in tokens
        return any(x in text for x in stops)

    def _prompt_logprobs(self, ids: list[int], tail: int = 0,
                         top: int = 0) -> tuple[list[float], list[dict[int, float]]]:
        """Logprobs of prompt tokens 1.. given the ones before, or of the last ``tail`` of them,
        and the ``top`` likeliest at each of those positions (one unpadded forward pass; logits
        only where needed)."""
        import torch

        n = min(tail, len(ids) - 1) if tail else len(ids) - 1
        with torch.inference_mode():
            logits = self._model(torch.tensor([ids], device=self._model.device), logits_to_keep=n + 1).logits[0, :-1]
        lp = logits.float().log_softmax(-1)
        own = lp.gather(-1, torch.tensor(ids[len(ids) - n:], device=lp.device)[:, None])[:, 0].tolist()
        if not top:
            return own, []
        vals, idx = lp.topk(top, dim=-1)
        return own, [dict(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]

    def _step(self, row: _Row, tid: int, eos: set[int]) -> None:
        """A streaming row's new token: send the text that can no longer change."""
        if tid in eos:
            row.finished = True
            return
        row.new_ids.append(tid)
        if row.sink is None:
            return
        text = self.decode(row.new_ids)
        visible, hit = stream_visible(text, row.params.stop, finished=False)
        if visible > row.shown:
            row.send(row.sink.put_nowait, GenerationChunk(text=text[row.shown:visible],
                                                          completion_tokens=len(row.new_ids),
                                                          prompt_tokens=len(row.ids)))
            row.shown = visible
        row.finished = hit

    def _finish_stream(self, row: _Row, g: Generation) -> None:
        """The last chunk: whatever of the final text was held back, and the finish reason."""
        assert row.sink is not None
        rest = g.text[row.shown:] if len(g.text) >= row.shown else ""
        row.send(row.sink.put_nowait, GenerationChunk(text=rest, completion_tokens=len(g.token_ids),
                                                      prompt_tokens=g.prompt_tokens,
                                                      finish_reason=g.finish_reason))
