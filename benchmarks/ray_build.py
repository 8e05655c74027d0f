"""Ray build overhead: `rag index build --ray` on a local 2-actor cluster vs a local build.

    .venv/bin/python benchmarks/ray_build.py [--docs 1000] [--precision fp32]

Both build the same SciFact passages with all-MiniLM-L6-v2 on the same cores, each in its own
process: the local build with torch on all cores, the Ray build with one single-threaded
embedder actor per core (the cluster started by the build, as `--ray` without an address does).
On one machine Ray cannot add compute, so the point is the overhead: cluster start, window
files, per-actor model loads. Reports the ratios and the largest vector difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import scifact, table  # noqa: E402

warnings.filterwarnings("ignore")


def run(method: str, corpus: Path, out: Path, precision: str) -> dict[str, float]:
    from rag.config import IndexRecipe
    from rag.index import build_index

    recipe = IndexRecipe(name="b", corpus=str(corpus), out=str(out), batch_size=64,
                         precision=precision)  # type: ignore[arg-type]
    started = 0.0
    opts = None
    if method == "ray":
        from rag.index.ray import RayOptions, connect

        t = time.perf_counter()
        connect(None)
        started = time.perf_counter() - t
        opts = RayOptions()
    t = time.perf_counter()
    build_index(recipe, progress=False, ray=opts)
    return {"start": started, "build": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--method")
    ap.add_argument("--corpus")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.method:
        print(json.dumps(run(args.method, Path(args.corpus), Path(args.out), args.precision)))
        return
    import faiss
    import numpy as np

    docs = scifact()[0][: args.docs]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "c.jsonl"
        corpus.write_text("".join(json.dumps({"id": d["_id"], "title": d["title"], "text": d["text"]}) + "\n"
                                  for d in docs))
        res = {}
        for method in ("local", "ray"):
            out = subprocess.run([sys.executable, __file__, "--method", method, "--corpus", str(corpus),
                                  "--out", f"{tmp}/{method}", "--precision", args.precision],
                                 capture_output=True, text=True, check=True)
            res[method] = json.loads(out.stdout.strip().splitlines()[-1])
        a, b = (faiss.read_index(f"{tmp}/{m}/index.faiss") for m in ("local", "ray"))
        diff = float(np.abs(a.reconstruct_n(0, a.ntotal) - b.reconstruct_n(0, b.ntotal)).max())
    n = len(docs)
    local = res["local"]["build"]
    rows = [["local build (torch, all cores)", "", round(local, 1), round(n / local, 1), 1.0],
            ["ray build, 2 actors x 1 CPU", round(res["ray"]["start"], 1), round(res["ray"]["build"], 1),
             round(n / res["ray"]["build"], 1), round(local / res["ray"]["build"], 3)],
            ["ray incl. cluster start", "", round(res["ray"]["start"] + res["ray"]["build"], 1),
             round(n / (res["ray"]["start"] + res["ray"]["build"]), 1),
             round(local / (res["ray"]["start"] + res["ray"]["build"]), 3)]]
    print(f"{n} SciFact passages, all-MiniLM-L6-v2 {args.precision}, same 2-core machine")
    print(table(rows, ["method", "cluster start s", "build s", "passages/s", "throughput vs local"]))
    print(f"ray / local throughput ratio: {local / res['ray']['build']:.3f} "
          f"(incl. cluster start {local / (res['ray']['start'] + res['ray']['build']):.3f}); "
          f"max |vector difference| {diff:.2e}")


if __name__ == "__main__":
    main()
