"""transformers backend: batched generation with full logits (exact requested-id logprobs)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from rag.errors import ConfigError, GenerationError, missing_extra
from rag.models import resolve_model
from rag.types import Generation, GenerationParams

log = logging.getLogger(__name__)


def _dtype(torch: Any, name: str, device: str) -> Any:
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


class TransformersGenerator:
    """Generation through ``transformers`` (CPU or CUDA).

    Args:
        model: packaged name, local folder or cached hub id (see `rag.models.resolve_model`).
        device: ``auto`` | ``cpu`` | ``cuda``.
        dtype: ``auto`` (fp32 on CPU, bf16 on CUDA) | ``float32`` | ``bfloat16`` | ``float16``.
        batch_size: prompts per forward batch.
    """

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 16, model_obj: Any = None, tokenizer_obj: Any = None):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = model
        self.device_name = device
        self.dtype_name = dtype
        self.batch_size = batch_size
        self._model, self._tokenizer = model_obj, tokenizer_obj
        self._lock = threading.Lock()

    def load(self) -> TransformersGenerator:
        if self._model is not None:
            self._setup_tokenizer()
            return self
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
        self._setup_tokenizer()
        return self

    def _setup_tokenizer(self) -> None:
        tok = self._tokenizer
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token

    @property
    def tokenizer(self) -> Any:
        return self.load()._tokenizer

    @property
    def model(self) -> Any:
        return self.load()._model

    def _eos_ids(self, params: GenerationParams) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids + [i for i in params.stop_token_ids if i not in ids]

    def _gen_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": params.max_new_tokens,
                              "eos_token_id": self._eos_ids(params),
                              "pad_token_id": self.tokenizer.pad_token_id}
        if params.temperature > 0:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kw.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        return kw

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generation]:
        """Generate one completion per prompt, ``batch_size`` prompts per forward pass."""
        out: list[Generation] = []
        for i in range(0, len(prompts), self.batch_size):
            out.extend(self._generate_batch(list(prompts[i : i + self.batch_size]), params))
        return out

    def _generate_batch(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        import torch

        tok, model = self.tokenizer, self.model
        vocab = model.get_output_embeddings().weight.shape[0]
        bad = [i for i in params.logprob_token_ids if not 0 <= i < vocab]
        if bad:
            raise GenerationError(f"logprob_token_ids {bad} are outside the vocabulary (0..{vocab - 1})")
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with self._lock, torch.inference_mode():
            res = model.generate(**enc, **self._gen_kwargs(params), output_logits=True,
                                 return_dict_in_generate=True)
        new = res.sequences[:, enc["input_ids"].shape[1]:]
        # raw (unprocessed) logits -> log-probabilities, like vLLM's default raw_logprobs
        logprobs = torch.stack(res.logits, dim=1).float().log_softmax(-1)  # (batch, steps, vocab)
        eos = set(self._eos_ids(params))
        gens = []
        for b, prompt_len in enumerate(enc["attention_mask"].sum(-1).tolist()):
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
            text = tok.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            text, hit = _cut_at_stop(text, params.stop)
            gens.append(Generation(text=text, token_ids=ids, token_logprobs=token_lp, logprobs=req,
                                   top_logprobs=top, finish_reason="stop" if hit else finish,
                                   prompt_tokens=int(prompt_len)))
        return gens

    def stream(self, prompt: str, params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated (one prompt); setting ``cancel`` stops the
        generation at the next token."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop_event = cancel or threading.Event()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> bool:
                return stop_event.is_set()

        tok, model = self.tokenizer, self.model
        enc = tok([prompt], return_tensors="pt", add_special_tokens=False).to(model.device)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    model.generate(**enc, **self._gen_kwargs(params), streamer=streamer,
                                   stopping_criteria=StoppingCriteriaList([_Cancelled()]))
            except BaseException as e:  # surfaced in the consumer thread
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        eos_text = [t for t in (tok.eos_token,) if t]
        emitted = ""
        for piece in streamer:
            emitted += piece
            cut, hit = _cut_at_stop(emitted, params.stop + eos_text)
            new = cut[len(emitted) - len(piece):] if len(cut) > len(emitted) - len(piece) else ""
            if new:
                yield new
            if hit or stop_event.is_set():
                stop_event.set()
                break
        thread.join()
        if errors:
            raise GenerationError(f"generation failed: {errors[0]}") from errors[0]


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
