"""The 15 reflection tokens, looked up through the tokenizer (never hard-coded ids)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rag.errors import ConfigError

if TYPE_CHECKING:
    from rag.generation import Generator

RETRIEVAL = ("[No Retrieval]", "[Retrieval]", "[Continue to Use Evidence]")
RELEVANCE = ("[Relevant]", "[Irrelevant]")
PARAGRAPH = ("<paragraph>", "</paragraph>")
UTILITY = ("[Utility:1]", "[Utility:2]", "[Utility:3]", "[Utility:4]", "[Utility:5]")
SUPPORT = ("[Fully supported]", "[Partially supported]", "[No support / Contradictory]")


@dataclass(frozen=True, slots=True)
class ReflectionTokens:
    """Token ids of the reflection tokens for one tokenizer."""

    no_retrieval: int
    retrieval: int
    continue_evidence: int
    relevant: int
    irrelevant: int
    paragraph_open: int
    paragraph_close: int
    utility: tuple[int, int, int, int, int]
    support: tuple[int, int, int]  # fully, partially, none

    @classmethod
    def from_generator(cls, generator: Generator) -> ReflectionTokens:
        """Ids through ``generator.token_id``; raises `ConfigError` naming the missing tokens
        when the model lacks them."""
        strings = RETRIEVAL + RELEVANCE + PARAGRAPH + UTILITY + SUPPORT
        ids: dict[str, int] = {}
        missing = []
        for s in strings:
            tid = generator.token_id(s)
            if tid is None:
                missing.append(s)
            else:
                ids[s] = tid
        if missing:
            raise ConfigError(
                f"this model's tokenizer lacks the Self-RAG reflection tokens {missing}; use a "
                "Self-RAG model (selfrag_llama2_7b/13b, SciPhi-Self-RAG) or set "
                "selfrag.critic: prompted to critique with prompts instead")
        return cls(no_retrieval=ids[RETRIEVAL[0]], retrieval=ids[RETRIEVAL[1]],
                   continue_evidence=ids[RETRIEVAL[2]], relevant=ids[RELEVANCE[0]],
                   irrelevant=ids[RELEVANCE[1]], paragraph_open=ids[PARAGRAPH[0]],
                   paragraph_close=ids[PARAGRAPH[1]],
                   utility=tuple(ids[s] for s in UTILITY),  # type: ignore[arg-type]
                   support=tuple(ids[s] for s in SUPPORT))  # type: ignore[arg-type]

    @property
    def all_ids(self) -> list[int]:
        return [self.no_retrieval, self.retrieval, self.continue_evidence, self.relevant,
                self.irrelevant, self.paragraph_open, self.paragraph_close, *self.utility,
                *self.support]
