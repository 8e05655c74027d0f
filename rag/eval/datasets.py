"""Question-set loaders: Self-RAG eval JSONL, FlashRAG, SQuAD v1.1, NQ-open, BEIR, ARC, ALCE
(ASQA) JSON, TSV, and conversational sets (MTRAG's layout: every user turn with the conversation
so far).

Every loader returns `EvalItem`s; a malformed record raises `CorpusError` with file and line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rag.corpus import json_lines, squad_passage_id
from rag.errors import CorpusError
from rag.types import ChatMessage, Passage

FORMATS = ("auto", "selfrag", "flashrag", "squad", "nq", "beir", "arc", "alce", "factscore", "tsv",
           "conversations")
#: A conversational turn's type, from MTRAG's ``multi_turn`` field (the first turn is ``first``).
TURN_TYPES = {"follow-up": "follow-up", "clarification": "clarification", "n/a": "first"}
#: ARC's numeric labels (a few AI2 questions use 1-4) as the letters the prompts use
ARC_LABELS = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}


class EvalItem(BaseModel):
    """One question with its gold answers and/or gold passages."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    question: str
    answers: list[str] = Field(default_factory=list)
    gold_ids: list[str] = Field(default_factory=list, description="gold passage ids")
    qrels: dict[str, int] = Field(default_factory=dict, description="graded judgments (BEIR/TREC qrels), "
                                  "zeros included; empty = every gold id counts 1")
    choices: list[tuple[str, str]] | None = Field(None, description="(label, text) for multiple choice")
    answer_key: str | None = None
    ctxs: list[Passage] | None = Field(None, description="pre-retrieved passages")
    extra: dict[str, Any] = Field(default_factory=dict, description="the record's other fields, "
                                  "kept for scorers that read them (ALCE's qa_pairs, FactScore's topic)")
    messages: list[ChatMessage] | None = Field(None, description="a conversational turn: the conversation "
                                               "so far, ending with the question (answered as given)")
    group: str | None = Field(None, description="the item's kind for per-group measures (a turn's type: "
                                                "first, follow-up, clarification)")
    long_answers: bool = Field(False, description="the gold answers are long: no exact match, token F1 "
                                                  "and ROUGE-L instead")

    @property
    def judgments(self) -> dict[str, int]:
        """Graded relevance of judged passages (the qrels, or 1 for each gold id)."""
        return dict(self.qrels) if self.qrels else dict.fromkeys(self.gold_ids, 1)

    @property
    def closed(self) -> bool:
        return self.choices is not None

    def conversation(self, layout: str = "as_given") -> list[ChatMessage]:
        """What the pipeline is asked: the conversation so far, or the question as one user turn."""
        return self.messages or [ChatMessage(role="user", content=self.prompt_text(layout))]

    def prompt_text(self, layout: str = "as_given") -> str:
        """The question as a pipeline sees it, choices listed for multiple choice: as given, or in
        the ``reference`` layout of ``run_short_form.py`` (labels A-D only, so a question with
        three options gets an empty ``D:`` line and a fifth option is left out)."""
        if not self.choices:
            return self.question
        choices = self.choices
        if layout == "reference":
            given = dict(choices)
            choices = [(label, given.get(label, "")) for label in "ABCD"]
        return self.question + "".join(f"\n{label}: {text}" for label, text in choices)


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"question set not found: {p}")
    if p.is_dir():
        if (p / "conversations.jsonl").exists():
            return "conversations"
        if (p / "queries.jsonl").exists():
            return "beir"
        raise CorpusError(f"{p} is a folder without queries.jsonl or conversations.jsonl; give a question file")
    if p.name == "queries.jsonl" and (p.parent / "qrels").exists():
        return "beir"
    if p.suffix == ".tsv":
        return "tsv"
    if p.suffix == ".json":
        return "squad" if _json_records(p) is None else "alce"
    with p.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        keys = set(json.loads(first))
    except (json.JSONDecodeError, TypeError):
        raise CorpusError("first record is not a JSON object; pass --format", source=str(p), line=1) from None
    if "golden_answers" in keys:
        return "flashrag"
    if "answerKey" in keys and "choices" in keys:
        return "arc"
    if {"input", "topic"} <= keys:
        return "factscore"
    if "answers" in keys:
        return "selfrag"
    if "answer" in keys:
        return "nq"
    raise CorpusError(f"cannot tell the question-set format from keys {sorted(keys)}; pass --format "
                      f"one of {', '.join(FORMATS[1:])}", source=str(p), line=1)


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, obj in json_lines(path):
        if isinstance(obj, CorpusError):
            raise obj
        yield lineno, obj


def _need(obj: dict[str, Any], key: str, path: Path, lineno: int, kind: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise CorpusError(f"missing field {key!r}", source=str(path), line=lineno)
    if not isinstance(obj[key], kind):
        raise CorpusError(f"field {key!r} has the wrong type ({type(obj[key]).__name__})",
                          source=str(path), line=lineno)
    return obj[key]


def _answers(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _ctxs(obj: dict[str, Any], path: Path, lineno: int, key: str = "ctxs") -> list[Passage] | None:
    raw = obj.get(key)
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise CorpusError(f"field {key!r} must be a list of passages", source=str(path), line=lineno)
    out = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict) or "text" not in c:
            raise CorpusError(f"{key}[{i}] must be an object with 'text'", source=str(path), line=lineno)
        out.append(Passage(id=str(c.get("id", f"{lineno}-{i}")), title=str(c.get("title", "")),
                           text=str(c["text"])))
    return out


def _extra(o: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in o.items() if k not in ("ctxs", "docs")}


def _selfrag(path: Path) -> Iterator[EvalItem]:
    """Self-RAG eval JSONL: ``question`` with gold in ``answers`` (or ``answer`` / ``output``),
    or FactScore's ``input`` (no gold); optional ``ctxs``."""
    for lineno, o in _jsonl(path):
        factscore = "question" not in o and "input" in o
        q = _need(o, "input" if factscore else "question", path, lineno, str)
        gold_key = next((k for k in ("answers", "answer", "output") if k in o), "answers")
        answers = [] if factscore else _answers(_need(o, gold_key, path, lineno, (list, str)))
        qid = str(o.get("question_id", o.get("id", lineno)))
        yield EvalItem(id=qid, question=q, answers=answers, ctxs=_ctxs(o, path, lineno), extra=_extra(o))


def _json_records(path: Path) -> list[Any] | None:
    """The question records of an ALCE-style JSON file (a list, or ``{"data": [...]}`` of
    objects with ``question``); None for anything else (a SQuAD file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorpusError(f"not valid JSON ({e.msg} at line {e.lineno})", source=str(path), line=e.lineno) from None
    records = data.get("data") if isinstance(data, dict) else data
    if isinstance(records, list) and records and isinstance(records[0], dict) and "question" in records[0]:
        return records
    return None


def _alce(path: Path) -> Iterator[EvalItem]:
    """ALCE JSON (ASQA ``asqa_eval_gtr_top100.json``): ``question``, pre-retrieved ``docs``,
    gold short answers from ``qa_pairs`` (or ``answer``); every other field is kept for the
    ALCE scorer."""
    records = _json_records(path)
    if records is None:
        raise CorpusError("expected a JSON list (or {\"data\": [...]}) of objects with 'question'",
                          source=str(path))
    for i, o in enumerate(records, 1):
        if not isinstance(o, dict) or not isinstance(o.get("question"), str):
            raise CorpusError(f"record {i} has no 'question' string", source=str(path))
        answers = [a for qa in o.get("qa_pairs") or [] for a in qa.get("short_answers", [])]
        if not answers and o.get("answer"):
            answers = _answers(o["answer"])
        yield EvalItem(id=str(o.get("sample_id", o.get("id", i))), question=o["question"], answers=answers,
                       ctxs=_ctxs(o, path, i, key="docs") or _ctxs(o, path, i), extra=_extra(o))


def _flashrag(path: Path) -> Iterator[EvalItem]:
    for lineno, o in _jsonl(path):
        yield EvalItem(id=str(o.get("id", lineno)), question=_need(o, "question", path, lineno, str),
                       answers=_answers(_need(o, "golden_answers", path, lineno, (list, str))),
                       ctxs=_ctxs(o, path, lineno))


def _factscore(path: Path) -> Iterator[EvalItem]:
    """FActScore's input JSONL (``input``, ``topic``, ``output``; Self-RAG's bio set adds
    ``ctxs``): the ``input`` is the question, ``topic`` is kept for factscorer.py."""
    for lineno, o in _jsonl(path):
        _need(o, "topic", path, lineno, str)
        yield EvalItem(id=str(o.get("id", lineno)), question=_need(o, "input", path, lineno, str),
                       ctxs=_ctxs(o, path, lineno), extra=_extra(o))


def _nq(path: Path) -> Iterator[EvalItem]:
    for lineno, o in _jsonl(path):
        yield EvalItem(id=str(o.get("id", lineno)), question=_need(o, "question", path, lineno, str),
                       answers=_answers(_need(o, "answer", path, lineno, (list, str))))


def _arc(path: Path) -> Iterator[EvalItem]:
    for lineno, o in _jsonl(path):
        choices = _need(o, "choices", path, lineno, dict)
        labels, texts = choices.get("label"), choices.get("text")
        if not isinstance(labels, list) or not isinstance(texts, list) or len(labels) != len(texts):
            raise CorpusError("choices must have equal-length 'label' and 'text' lists",
                              source=str(path), line=lineno)
        key = str(_need(o, "answerKey", path, lineno, (str, int)))
        key = ARC_LABELS.get(key, key)
        pairs = list(zip([ARC_LABELS.get(str(x), str(x)) for x in labels], [str(x) for x in texts], strict=True))
        answer_text = dict(pairs).get(key)
        yield EvalItem(id=str(o.get("id", lineno)), question=_need(o, "question", path, lineno, str),
                       answers=[key] + ([answer_text] if answer_text else []), choices=pairs,
                       answer_key=key, ctxs=_ctxs(o, path, lineno))


def _squad(path: Path) -> Iterator[EvalItem]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorpusError(f"not a SQuAD v1.1 file ({e})", source=str(path)) from None
    for article in data:
        title = str(article.get("title", ""))
        for i, para in enumerate(article.get("paragraphs", [])):
            for qa in para.get("qas", []):
                if "question" not in qa or "id" not in qa:
                    raise CorpusError(f"a question of {title!r} paragraph {i} lacks 'question'/'id'",
                                      source=str(path))
                yield EvalItem(id=str(qa["id"]), question=qa["question"],
                               answers=[a["text"] for a in qa.get("answers", [])],
                               gold_ids=[squad_passage_id(title, i)])


def _beir(path: Path, qrels_path: Path | None = None) -> Iterator[EvalItem]:
    """BEIR folder: ``queries.jsonl`` and ``qrels/test.tsv`` (else the first ``qrels/*.tsv``),
    graded judgments kept; queries without a judgment are skipped."""
    from rag.eval.retrieval import read_qrels

    folder = path if path.is_dir() else path.parent
    qrels_dir = folder / "qrels"
    if qrels_path is None:
        candidates = [qrels_dir / "test.tsv"] if (qrels_dir / "test.tsv").exists() else sorted(qrels_dir.glob("*.tsv"))
        if not candidates:
            raise CorpusError(f"no qrels/*.tsv next to {folder / 'queries.jsonl'}; pass --qrels FILE")
        qrels_path = candidates[0]
    judged = read_qrels(qrels_path)
    for lineno, o in _jsonl(folder / "queries.jsonl"):
        qid = str(_need(o, "_id", folder / "queries.jsonl", lineno, (str, int)))
        if qid in judged:
            yield EvalItem(id=qid, question=_need(o, "text", folder / "queries.jsonl", lineno, str),
                           gold_ids=[d for d, r in judged[qid].items() if r > 0], qrels=judged[qid])


def _tsv(path: Path) -> Iterator[EvalItem]:
    """``question<TAB>answers`` (answers a JSON list or ``|``-separated), optional header."""
    with path.open(encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (lineno == 1 and row[0].lower() == "question"):
                continue
            if len(row) < 2:
                raise CorpusError("expected question<TAB>answers", source=str(path), line=lineno)
            raw = row[1]
            try:
                answers = _answers(json.loads(raw)) if raw.startswith("[") else raw.split("|")
            except json.JSONDecodeError:
                raise CorpusError("answers column is not a valid JSON list", source=str(path), line=lineno) from None
            yield EvalItem(id=str(lineno), question=row[0], answers=answers)


def _conversations(path: Path) -> Iterator[EvalItem]:
    """A conversational folder: ``conversations.jsonl`` (one line per user turn: ``id``,
    ``messages`` ending with that turn, ``golden_answers``, ``multi_turn``) and ``qrels.tsv``
    (BEIR layout, by turn id; else the lines' ``gold_passages``)."""
    from rag.eval.retrieval import read_qrels

    folder = path if path.is_dir() else path.parent
    file = folder / "conversations.jsonl"
    judged = read_qrels(folder / "qrels.tsv") if (folder / "qrels.tsv").exists() else {}
    for lineno, o in _jsonl(file):
        raw = _need(o, "messages", file, lineno, list)
        try:
            messages = [ChatMessage.model_validate(m) for m in raw]
        except ValueError as e:
            raise CorpusError(f"'messages' is not a list of {{role, content}}: {e}", source=str(file),
                              line=lineno) from None
        if not messages or messages[-1].role != "user":
            raise CorpusError("'messages' must end with the user turn to answer", source=str(file), line=lineno)
        qid = str(_need(o, "id", file, lineno, (str, int)))
        qrels = judged.get(qid) or dict.fromkeys(o.get("gold_passages") or [], 1)
        kind = str(o.get("multi_turn") or ("n/a" if len(messages) == 1 else "follow-up")).lower()
        yield EvalItem(id=qid, question=messages[-1].content, messages=messages, long_answers=True,
                       answers=_answers(o.get("golden_answers") or o.get("answers") or []),
                       gold_ids=[d for d, r in qrels.items() if r > 0], qrels=qrels,
                       group=TURN_TYPES.get(kind, kind),
                       extra={k: v for k, v in _extra(o).items() if k not in ("messages", "golden_answers")})


_LOADERS = {"selfrag": _selfrag, "flashrag": _flashrag, "squad": _squad, "nq": _nq, "beir": _beir,
            "arc": _arc, "alce": _alce, "factscore": _factscore, "tsv": _tsv, "conversations": _conversations}


def load_dataset(path: str | Path, format: str = "auto", *, limit: int | None = None,
                 qrels: str | Path | None = None) -> list[EvalItem]:
    """Load a question set (first ``limit`` items). ``qrels`` (BEIR TSV or TREC qrels) gives the
    judgments: for a BEIR folder it replaces ``qrels/test.tsv``; for any other set it is matched
    to the questions by id."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in _LOADERS:
        raise CorpusError(f"unknown question-set format {fmt!r}; use one of {', '.join(FORMATS)}")
    items = _beir(Path(path), Path(qrels)) if fmt == "beir" and qrels else _LOADERS[fmt](Path(path))
    if qrels and fmt != "beir":
        from rag.eval.retrieval import read_qrels

        judged = read_qrels(qrels)
        items = (it.model_copy(update={"qrels": judged.get(it.id, {}),
                                       "gold_ids": [d for d, r in judged.get(it.id, {}).items() if r > 0]})
                 for it in items)
    out: list[EvalItem] = []
    for item in items:
        out.append(item)
        if limit is not None and len(out) >= limit:
            break
    return out
