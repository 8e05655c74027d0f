from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "transformers", "sentence_transformers", "vllm", "faiss", "bm25s", "fastapi",
         "langchain_core"]


def test_import_rag_loads_no_heavy_library() -> None:
    code = ("import sys, json, rag; rag.Passage; rag.RagError; import rag.cli; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_public_names_resolve() -> None:
    import rag

    for name in rag.__all__:
        assert getattr(rag, name) is not None
