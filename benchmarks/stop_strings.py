"""Stop strings on the transformers backend: one request with N stop strings through our
`TransformersGenerator` (stop strings checked on each row's decoded tail) against raw
``model.generate(stop_strings=..., tokenizer=...)`` (transformers' `StopStringCriteria`, whose
tables are built per call), on the packaged SmolLM2, greedy, same prompt and token budget.

    .venv/bin/python benchmarks/stop_strings.py [--counts 0,4,16] [--tokens 24]

Prints seconds per request for each and the ratio; the texts must be equal (the stop strings are
random letters that never occur, so both run to the token budget).
"""

from __future__ import annotations

import argparse
import random
import string
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, timed  # noqa: E402

PROMPT = "The river Nile flows through"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="0,4,16")
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    import torch

    from rag.generation.hf import TransformersGenerator
    from rag.models import prepare_packaged_model
    from rag.types import GenerationParams

    gen = TransformersGenerator(str(prepare_packaged_model()), dtype="float32").load()
    model, tok = gen.model, gen._tok()
    ids = torch.tensor([gen.encode(PROMPT)])
    rng = random.Random(0)
    rows = []
    for n in (int(c) for c in args.counts.split(",")):
        stops = ["".join(rng.choices(string.ascii_lowercase, k=12)) for _ in range(n)]
        params = GenerationParams(max_new_tokens=args.tokens, stop=stops)
        ours, t_ours = timed(lambda params=params: gen.generate([PROMPT], params)[0].text)  # type: ignore[misc]
        kw = {"stop_strings": stops, "tokenizer": tok} if stops else {}

        def raw(kw: dict[str, object] = kw) -> str:
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                     pad_token_id=tok.pad_token_id, **kw)
            return str(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False))

        theirs, t_raw = timed(raw)
        assert ours == theirs[: len(ours)], (ours, theirs)
        rows.append([n, t_ours, t_raw, t_raw / t_ours])
    gen.close()
    print(table(rows, ["stop strings", "rag hf s", "raw transformers stop_strings s", "raw / rag"]))


if __name__ == "__main__":
    main()
