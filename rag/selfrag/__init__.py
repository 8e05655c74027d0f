"""Self-RAG decoding (Asai et al., 2023): reflection tokens, critique scoring (pure functions),
short-form reranking, segment-level tree search, and a prompted critic for any model."""
