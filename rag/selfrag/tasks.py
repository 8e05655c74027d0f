"""Task presets: the settings the Self-RAG paper evaluated each task with.

``selfrag.task: popqa | triviaqa | pubhealth | arc_challenge | asqa | factscore`` in a pipeline
(or ``rag eval --task NAME``) sets the instruction, open/closed answer handling, answer mapping,
retrieval mode, passages per question, generation length, decoding and the metric the paper
reported, as the reference scripts ran them (``run_short_form.py`` / ``run_long_form_static.py``
with the flags of the repository's README). Any field the pipeline file sets itself wins over
the preset, also when ``--task`` names the task on the command line.

``open`` and ``closed`` are the two generic tasks: no instruction, answers taken as generated
(``open``) or voted over equal normalised answers (``closed``).
"""

from __future__ import annotations

from typing import Any

PUBHEALTH_INSTRUCTION = ("Is the following statement correct or not? Say true if it's correct; "
                         "otherwise say false.")
ARC_INSTRUCTION = "Given four answer candidates, A, B, C and D, choose the best answer choice."
ASQA_INSTRUCTION = ("Answer the following question. The question may be ambiguous and have multiple "
                    "correct answers, and in that case, you have to provide a long-form answer "
                    "including all correct answers.")

#: per task: settings of the pipeline (dotted paths into the config) and of the evaluation.
#: ``instruction`` takes ``{question}`` (for ARC the question followed by ``\nA: ..`` lines).
TASKS: dict[str, dict[str, Any]] = {
    "popqa": {"selfrag.mode": "adaptive", "selfrag.threshold": 0.2, "retrieval.top_k": 10,
              "generation.max_new_tokens": 100, "metric": "match"},
    "triviaqa": {"selfrag.mode": "adaptive", "selfrag.threshold": 0.2, "retrieval.top_k": 10,
                 "generation.max_new_tokens": 100, "metric": "match"},
    "pubhealth": {"selfrag.instruction": PUBHEALTH_INSTRUCTION + "\n\n## Input:\n\n{question}",
                  "selfrag.mode": "adaptive", "selfrag.threshold": 0.2, "retrieval.top_k": 5,
                  "generation.max_new_tokens": 50, "metric": "match"},
    "arc_challenge": {"selfrag.instruction": ARC_INSTRUCTION + "\n\n### Input:\n{question}",
                      "selfrag.mode": "adaptive", "selfrag.threshold": 0.2, "retrieval.top_k": 5,
                      "generation.max_new_tokens": 50, "metric": "accuracy"},
    "asqa": {"selfrag.instruction": ASQA_INSTRUCTION + "## Input:\n\n{question}",
             "selfrag.mode": "always", "selfrag.decoding": "long", "selfrag.max_depth": 7,
             "selfrag.beam_width": 2, "retrieval.top_k": 5, "generation.max_new_tokens": 300,
             "metric": "alce"},
    "factscore": {"selfrag.mode": "adaptive", "selfrag.threshold": 0.2, "selfrag.decoding": "long",
                  "selfrag.max_depth": 7, "selfrag.beam_width": 2, "retrieval.top_k": 5,
                  "generation.max_new_tokens": 300, "metric": "factscore"},
}
GENERIC = ("open", "closed")
CLOSED = ("closed", "pubhealth", "arc_challenge")
#: the reference maps PubHealth's FEVER-style labels before scoring (run_short_form.py)
ANSWER_MAPS: dict[str, dict[str, str]] = {"pubhealth": {"SUPPORTS": "true", "REFUTES": "false"}}


def map_answer(task: str, text: str) -> str:
    """The reference's label mapping: an answer containing ``SUPPORTS`` becomes ``true``,
    ``REFUTES`` ``false`` (PubHealth); other tasks are unchanged."""
    for label, value in ANSWER_MAPS.get(task, {}).items():
        if label in text:
            return value
    return text


def apply_preset(data: dict[str, Any], task: str) -> dict[str, Any]:
    """A copy of pipeline config ``data`` for ``task``, its preset filled in where the data sets
    nothing (a field the data sets wins)."""
    def plain(v: Any) -> Any:  # a section given as a model object (Python API) -> its set fields
        if hasattr(v, "model_dump"):
            return v.model_dump(exclude_unset=True)
        return dict(v) if isinstance(v, dict) else v

    out = {k: plain(v) for k, v in data.items()}
    selfrag = out.setdefault("selfrag", {})
    selfrag["task"] = task
    for path, value in TASKS.get(task, {}).items():
        if "." not in path:
            continue  # evaluation settings (metric)
        section, field = path.split(".")
        block = out.setdefault(section, {})
        block.setdefault(field, value)
    return out
