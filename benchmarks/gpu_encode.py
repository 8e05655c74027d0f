"""GPU encoding throughput of a MiniLM-L6-shaped encoder (6 layers, hidden 384, 12 heads,
random weights: same FLOPs as all-MiniLM-L6-v2) through `rag`'s SentenceTransformerEmbedder,
fp32 vs fp16, 100-word passages. For docs/scaling.md; needs CUDA.

    python benchmarks/gpu_encode.py [--passages 100000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from rag.embedding import SentenceTransformerEmbedder

    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args()
    words = [f"w{i}" for i in range(5000)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
        tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
        bert = BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=384, num_hidden_layers=6,
                                    num_attention_heads=12, intermediate_size=1536))
        bert.save_pretrained(folder / "raw")
        tok.save_pretrained(folder / "raw")
        SentenceTransformer(modules=[models.Transformer(str(folder / "raw"), max_seq_length=256),
                                     models.Pooling(384, "mean")]).save(str(folder / "st"))
        texts = [" ".join(words[(i * 7 + j) % 5000] for j in range(100)) for i in range(args.passages)]
        print(f"GPU: {torch.cuda.get_device_name()}; {args.passages} passages of 100 words "
              f"(~102 tokens), MiniLM-L6-shaped encoder, batch {args.batch_size}")
        for precision in ("fp32", "fp16", "bf16"):
            emb = SentenceTransformerEmbedder(str(folder / "st"), device="cuda", precision=precision,
                                              batch_size=args.batch_size).load()
            emb.encode_passages(texts[:2048])  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            emb.encode_passages(texts)
            torch.cuda.synchronize()
            secs = time.perf_counter() - t
            print(f"{precision}: {args.passages / secs:,.0f} passages/s "
                  f"({secs:.1f} s; 21M passages -> {21_000_000 / (args.passages / secs) / 60:.0f} min on this GPU)")


if __name__ == "__main__":
    main()
