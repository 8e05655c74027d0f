"""Validated configuration objects: index recipes (and, later, pipeline configs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from rag.errors import ConfigError, validation_message
from rag.types import GenerationParams

Metric = Literal["ip", "l2"]


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


_ConfigT = TypeVar("_ConfigT", bound=_Config)

#: The pipeline ``rag ask``/``chat``/``serve`` use without ``--pipeline``; it ships in the package,
#: so those commands work from any folder (with ``--index``).
DEFAULT_PIPELINE = Path(__file__).resolve().parent / "pipelines" / "default.yaml"


class IndexRecipe(_Config):
    """How to build one index. Relative paths in a YAML recipe are relative to the project root
    (the folder holding ``indexes/``), so recipes stay portable."""

    name: str = Field(description="index name; the folder defaults to indexes/<name>")
    corpus: str = Field(description="corpus file or folder, or pydoc_data.topics")
    format: Literal["auto", "jsonl", "flashrag", "dpr", "beir", "squad", "dir", "pydoc"] = "auto"
    out: str | None = Field(None, description="output folder (default indexes/<name>)")
    embedder: str = "all-MiniLM-L6-v2"
    normalize: bool = True
    prompts: str = Field("model", description="query/passage prompts: model (what the encoder declares in "
                         "its sentence-transformers config), none, e5, bge, gte-instruct, instructor")
    query_prompt: str = Field("", description="explicit query prefix (overrides prompts)")
    passage_prompt: str = Field("", description="explicit passage prefix (overrides prompts)")
    factory: str = Field("Flat", description="FAISS factory string: Flat, HNSW32, IVF1024,PQ64 ...")
    metric: Metric = "ip"
    batch_size: int = Field(256, ge=1, description="passages encoded and checkpointed per step")
    chunk_size: int = Field(100, ge=1, description="words per chunk for text folders / pydoc")
    chunk_stride: int | None = Field(None, ge=1, description="words between chunk starts")
    skip_bad_lines: bool = False
    train_size: int | None = Field(None, ge=1, description="vectors sampled to train IVF/PQ")
    device: Literal["auto", "cpu", "gpu"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "fp32", description="encoder precision: auto = fp16 on CUDA, bf16 on CPUs with bf16 units; "
                "int8 = quantised ONNX on ONNX Runtime (CPU, the int8 extra)")

    @field_validator("factory")
    @classmethod
    def _factory_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("factory must be a FAISS factory string such as 'Flat' or 'HNSW32'")
        return v.strip()

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("indexes") / self.name

    @classmethod
    def from_options(cls, recipe: str | Path | None = None, **options: Any) -> IndexRecipe:
        """A recipe file (or, without one, a recipe named after ``out`` or ``corpus``) with the
        options that are set (not None) applied on top; errors name the file or the option."""
        given = {k: v for k, v in options.items() if v is not None}
        if recipe is not None:
            return load_recipe(recipe).with_overrides(**given)
        if "corpus" not in given:
            raise ConfigError("give a recipe (rag index build indexes/NAME.yaml) or --corpus PATH")
        name = Path(str(given.get("out") or given["corpus"]).rstrip("/")).name.split(".")[0] or "index"
        return cls._checked({"name": name, **given})

    def with_overrides(self, **options: Any) -> IndexRecipe:
        """This recipe with ``options`` replacing its fields, validated again."""
        return self._checked({**self.model_dump(exclude_unset=True), **options})

    @classmethod
    def _checked(cls, fields: dict[str, Any]) -> IndexRecipe:
        try:
            return cls(**fields)
        except ValidationError as e:
            raise ConfigError(f"options: {validation_message(e.errors())}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings at the top level")
    return data


def _load(path: str | Path, model: type[_ConfigT]) -> _ConfigT:
    """Read a YAML file into ``model``; errors name the file and the field."""
    data = load_yaml(path)
    try:
        return model(**data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {validation_message(e.errors())}") from None


def load_recipe(path: str | Path) -> IndexRecipe:
    """Read an index recipe YAML; errors name the file and the field."""
    return _load(path, IndexRecipe)


class FusionConfig(_Config):
    """How ``mode: hybrid`` fuses dense and BM25 (`rag.retriever.fuse`); ``rag tune fusion``
    chooses these on held-out queries and records them here."""

    method: Literal["rrf", "minmax"] = Field("rrf", description="weighted reciprocal rank, or min-max "
                                             "normalised scores, summed")
    dense_weight: float = Field(0.5, ge=0.0, le=1.0, description="dense side's weight; BM25 gets 1 - this")
    rrf_k: int = Field(60, ge=1, description="rrf: score = w / (rrf_k + rank)")
    candidates: int = Field(100, ge=1, description="hits taken from each side before fusing")


class RerankConfig(_Config):
    """``retrieval.rerank``: a second stage over the first stage's top ``candidates`` (`rag.rerank`)."""

    method: Literal["cross_encoder", "llm", "remote"] = "cross_encoder"
    model: str = Field(description="cross_encoder: a local model folder (or cached hub id); llm: "
                       "'generator' (the pipeline's own) or a model for the transformers backend; remote: "
                       "the server's model name")
    candidates: int = Field(50, ge=1, le=1000, description="first-stage hits rescored (at least top_k)")
    weight: float = Field(1.0, ge=0.0, le=1.0, description="1: the reranker's order; less: its order fused "
                          "with the first stage's by weighted reciprocal rank")
    base_url: str | None = Field(None, description="remote: the API root (POST {base_url}/rerank)")
    api_key_env: str | None = Field(None, description="remote: environment variable holding the key")


class RetrievalConfig(_Config):
    mode: Literal["dense", "bm25", "hybrid", "none"] = Field(
        "dense", description="none: never retrieve, even when an index is given")
    fusion: FusionConfig = FusionConfig()
    top_k: int = Field(10, ge=1, le=1000, description="passages retrieved per query")
    context_chars: int = Field(2048, ge=1, description="character budget of the context string")
    device: Literal["auto", "cpu", "gpu"] = "auto"
    query: Literal["last_turn", "history", "rewrite", "hyde"] = Field(
        "last_turn", description="what a conversation is searched with: the last user turn (SciPhi's rule); "
        "history: that ranking fused with one searched by the last turn joined to the messages before it "
        "(no model call); "
        "rewrite: the generator rewrites the conversation into a standalone question; "
        "hyde: the last turn's ranking fused with one searched by a passage the generator writes to "
        "answer the conversation (query expansion, Gao et al. 2022)")
    history_weight: float = Field(0.2, ge=0.0, le=1.0, description="history: the joined turns' ranking's "
                                  "weight in the fusion (the last turn's gets 1 - this)")
    hyde_weight: float = Field(0.5, ge=0.0, le=1.0, description="hyde: the written passage's ranking's "
                               "weight in the fusion (the last turn's gets 1 - this)")
    rerank: RerankConfig | None = None
    history_messages: int = Field(1, ge=0, description="history: the user and assistant messages before the "
                                  "last turn that join it in the second query (0: every earlier user turn)")


class GeneratorConfig(_Config):
    backend: Literal["hf", "vllm", "openai", "scripted"] = "hf"
    model: str = Field("smollm2-135m-instruct", description="openai: the name the server serves")
    dtype: str = "auto"
    batch_size: int = Field(16, ge=1, description="hf: prompts per forward pass")
    max_model_len: int | None = Field(4096, ge=64, description="context cap in tokens (prompt + new "
                                      "tokens): vllm sizes its KV cache by it; vllm and hf refuse longer requests")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    base_url: str | None = Field(None, description="openai: the server's API root, http://host:port/v1")
    api_key_env: str | None = Field(None, description="openai: environment variable holding the key")
    tokenizer: str | None = Field(None, description="openai: local tokenizer folder (default: model)")
    timeout_s: float = Field(120.0, gt=0, description="openai: per-request timeout")
    max_retries: int = Field(2, ge=0, description="openai: retries on connection errors, 429 and 5xx")

    @model_validator(mode="after")
    def _remote(self) -> GeneratorConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend openai needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.backend != "openai" and (self.base_url or self.api_key_env):
            raise ValueError(f"base_url and api_key_env are for backend openai, not {self.backend}")
        return self


class PromptConfig(_Config):
    format: Literal["sciphi", "selfrag", "mistral_inst", "chatml", "plain", "hf_template"] = "hf_template"
    system_prompt: str | None = Field(None, description="sciphi: replaces ALPACA_CHAT_SYSTEM_PROMPT")
    context_template: str | None = Field(None, description="how the context is written in")
    context_position: Literal["response", "user"] = Field(
        "response", description="after the generation prompt (SciPhi) or inside the last user turn")


class SelfRagSettings(_Config):
    """Self-RAG decoding. Defaults follow the paper; pipelines/selfrag-short-compat.yaml and
    selfrag-long-compat.yaml set the flags that reproduce the reference scripts."""

    mode: Literal["always", "never", "adaptive"] = "adaptive"
    threshold: float = Field(0.2, ge=0.0, le=1.0, description="adaptive retrieval threshold")
    compat_log_ratio: bool = Field(False, description="reference bug: ratio on log-probabilities")
    critic: Literal["tokens", "prompted"] = Field(
        "tokens", description="reflection tokens (Self-RAG models) or prompted critique (any model)")
    task: Literal["open", "closed", "popqa", "triviaqa", "pubhealth", "arc_challenge", "asqa", "factscore"] = Field(
        "open", description="open | closed (vote over equal answers) | a paper task preset (rag.selfrag.tasks)")
    instruction: str | None = Field(None, description="task instruction; {question} is replaced")
    w_rel: float = 1.0
    w_sup: float = 1.0
    w_use: float = 0.5
    w_ret: float = Field(0.0, ge=0.0, description="weight of the retrieval prior 1/rank in a candidate's "
                         "score (0: the paper's formula; rag tune critic calibrates it)")
    use_seq: bool = Field(True, description="add exp(mean token logprob) to the score")
    choice_layout: Literal["as_given", "reference"] = Field(
        "as_given", description="multiple choice in the prompt: every option as given, or the reference "
        "script's layout (labels A-D only: an empty 'D: ' line for 3 options, a fifth option dropped)")
    relevance: Literal["likelihood", "question"] = Field(
        "likelihood", description="prompted critic's IsRel: likelihood (of the question given the passage, "
        "normalised over the question's passages) or question (a Yes/No question)")
    candidates: int | None = Field(
        None, ge=1, description="short form: generate answers only for the N passages that a relevance "
        "screen (one IsRel question per passage, plus w_ret/rank) ranks highest; null: one per "
        "retrieved passage (the paper)")
    critique_single: bool = Field(
        False, description="prompted critic: also ask IsSup/IsUse of a question's only candidate (with "
        "candidates: 1 they cannot change the answer; its scores then carry s_sup/s_use, else null)")
    decoding: Literal["short", "long"] = "short"
    max_depth: int = Field(7, ge=1, le=20)
    beam_width: int = Field(2, ge=1, le=16)
    segment_retrieval: Literal["static", "per_segment"] = "per_segment"
    path_score: Literal["mean", "product"] = Field(
        "mean", description="combine segment scores along a path (reference: product)")
    select: Literal["best", "deepest"] = Field(
        "best", description="final path: best score, or best at the deepest level (reference)")
    segment_context: Literal["all", "newest"] = Field(
        "all", description="long-form: a segment sees every passage of its path, or only the newest "
                           "(reference run_long_form_static.py)")

    @property
    def closed(self) -> bool:
        """Answers are voted over equal normalised answers (true/false, choice letters)."""
        from rag.selfrag.tasks import CLOSED

        return self.task in CLOSED


class _PipelineBase(_Config):
    name: str
    index: str | None = Field(None, description="default index folder (--index overrides)")
    retrieval: RetrievalConfig = RetrievalConfig()
    expected: dict[str, Any] | None = Field(None, description="expected eval scores (rag eval --check)")


class _Generating(_PipelineBase):
    generator: GeneratorConfig = GeneratorConfig()
    prompt: PromptConfig = PromptConfig()
    generation: GenerationParams = GenerationParams()


class ChatPipelineConfig(_Generating):
    """``kind: chat`` (the default): the SciPhi chat flow over any chat format."""

    kind: Literal["chat"] = "chat"

    @model_validator(mode="before")
    @classmethod
    def _query_rewrite(cls, data: Any) -> Any:
        """``query_rewrite: true`` (older files) is ``retrieval.query: rewrite``."""
        if isinstance(data, dict) and "query_rewrite" in data:
            data = dict(data)
            if data.pop("query_rewrite"):
                data["retrieval"] = {**(data.get("retrieval") or {}), "query": "rewrite"}
        return data

    @model_validator(mode="after")
    def _sciphi_stop_token(self) -> ChatPipelineConfig:
        # SciPhi's get_chat_completion refuses to run unless generation stops at <paragraph>
        # (the model asking for more evidence); check it before anything loads.
        if self.prompt.format == "sciphi" and "<paragraph>" not in self.generation.stop:
            raise ValueError("generation.stop must include '<paragraph>' for the sciphi format "
                             "(the model stops when it asks for more evidence)")
        return self


class SelfRagPipelineConfig(_Generating):
    """``kind: selfrag``: the Self-RAG decoder (``prompt.format`` is the prompted critic's).
    ``selfrag.task`` naming a paper task fills in that task's preset (`rag.selfrag.tasks`) for
    every field the file does not set."""

    kind: Literal["selfrag"]
    selfrag: SelfRagSettings = SelfRagSettings()

    @model_validator(mode="after")
    def _question_only(self) -> SelfRagPipelineConfig:
        if self.retrieval.query != "last_turn":
            raise ValueError("retrieval.query must be last_turn for kind: selfrag (the decoder searches with "
                             "the question; history, rewrite and hyde are chat and retrieval strategies)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _task_preset(cls, data: Any) -> Any:
        from rag.selfrag.tasks import TASKS, apply_preset

        selfrag = data.get("selfrag") if isinstance(data, dict) else None
        task = selfrag.get("task") if isinstance(selfrag, dict) else getattr(selfrag, "task", None)
        if isinstance(task, str) and task in TASKS:
            return apply_preset(data, task)
        return data


class RetrievalPipelineConfig(_PipelineBase):
    """``kind: retrieval``: ranked hits, no generator."""

    kind: Literal["retrieval"]

    @model_validator(mode="after")
    def _no_rewrite(self) -> RetrievalPipelineConfig:
        if self.retrieval.query in ("rewrite", "hyde"):
            raise ValueError(f"retrieval.query: {self.retrieval.query} needs a generator, and a retrieval pipeline "
                             "has none; use last_turn or history")
        return self


PIPELINE_KINDS = {"chat": ChatPipelineConfig, "selfrag": SelfRagPipelineConfig,
                  "retrieval": RetrievalPipelineConfig}


def _kind(value: Any) -> str | None:
    return value.get("kind", "chat") if isinstance(value, dict) else getattr(value, "kind", None)


PipelineConfig = Annotated[
    Annotated[ChatPipelineConfig, Tag("chat")] | Annotated[SelfRagPipelineConfig, Tag("selfrag")]
    | Annotated[RetrievalPipelineConfig, Tag("retrieval")],
    Discriminator(_kind, custom_error_type="pipeline_kind",
                  custom_error_message="kind must be chat, selfrag or retrieval"),
]
_PIPELINE_ADAPTER: TypeAdapter[PipelineConfig] = TypeAdapter(PipelineConfig)


def pipeline_config(source: str | Path = "pipeline", **data: Any) -> PipelineConfig:
    """Validate a pipeline config; a field that does not belong to its ``kind`` is an error
    naming the field and the kind (``source`` names the file in messages)."""
    try:
        return _PIPELINE_ADAPTER.validate_python(data)
    except ValidationError as e:
        kind = data.get("kind", "chat")
        message = validation_message(e.errors(), drop=(kind,), rename={
            "extra_forbidden": f"field '{{field}}' is not a setting of kind: {kind} pipelines",
            "pipeline_kind": f"field 'kind' must be chat, selfrag or retrieval (got {kind!r})"})
        raise ConfigError(f"{source}: {message}") from None


def update_pipeline_file(path: str | Path, section: str, values: dict[str, Any], note: str, *,
                         out: str | Path | None = None) -> Path:
    """Merge ``values`` into one section of a pipeline YAML (``rag tune``'s write-back), check the
    result is still a valid pipeline, and write it atomically to ``out`` (default: the same
    file). The file's comment lines are kept, except an earlier note of the same command (the
    note's first three words, ``# rag tune fusion``), which ``note`` replaces."""
    path = Path(path)
    raw = load_yaml(path)
    raw[section] = {**raw.get(section, {}), **values}
    pipeline_config(path, **raw)  # still a valid pipeline
    command = " ".join(note.split()[:3])
    header = [line for line in path.read_text(encoding="utf-8").splitlines()
              if line.startswith("#") and not line.startswith(command)]
    target = Path(out) if out is not None else path
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text("\n".join([*header, note]) + "\n" + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    tmp.replace(target)
    return target


def load_pipeline_config(path: str | Path, *, task: str | None = None) -> PipelineConfig:
    """Read a pipeline YAML; errors name the file and the field. ``task`` (``rag eval --task``)
    sets the Self-RAG task and fills in its preset wherever the file sets nothing: a value the
    file sets explicitly wins (a compat recipe keeps its own depth under ``--task asqa``)."""
    data = load_yaml(path)
    if task is not None:
        from rag.selfrag.tasks import GENERIC, TASKS, apply_preset

        if data.get("kind") != "selfrag":
            raise ConfigError(f"{path}: --task {task} needs a kind: selfrag pipeline "
                              f"(this one is kind: {data.get('kind', 'chat')})")
        if task not in TASKS and task not in GENERIC:
            raise ConfigError(f"unknown task {task!r}; use one of {', '.join([*GENERIC, *TASKS])}")
        data = apply_preset(data, task)
    return pipeline_config(path, **data)
