"""LangChain integration (langchain-core only): a retriever over the store and chat / LLM wrappers that answer from
the retrieved documents' extensible embeddings.

Constructors are cheap (nothing loads until the first call), so the classes can be built per request; pass one
``Library`` to share the loaded LLM and index between them::

    library = Library("out/store")
    retriever = StoreRetriever(library=library, k=4)
    chat = ChatExtensible(library=library)
    chain = ChatPromptTemplate.from_template("{question}") | chat | StrOutputParser()

The chat model answers the last human message. It retrieves by itself, or reads the documents a retriever returned:
``chat.invoke(question, documents=retriever.invoke(question))``. Each reply carries the sources and k used in
``response_metadata``. They read with the library's default strategy, ``graded`` (the most relevant chunks
compressed, the nearest to the question refined, raw where they fit; see ``plan.DEFAULT_STRATEGY``);
``strategy="rag"`` reads only the nearest passages, raw.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import LLM, BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.retrievers import BaseRetriever
from pydantic import BaseModel, ConfigDict

from extensible.errors import UserError

from .library import Answer, Library, Source
from .plan import DEFAULT_STRATEGY


class _UsesLibrary(BaseModel):
    """A ``library`` given, or one opened from ``store`` on first use."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    library: Any = None
    store: str | None = None
    encoder: str = "minilm"
    window: int = 4096

    def get_library(self) -> Library:
        if self.library is None:
            if self.store is None:
                raise UserError("give library= or store=")
            self.library = Library(self.store, encoder=self.encoder, window=self.window)
        return self.library


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise UserError(f"StoreRetriever k={k!r}: k is the number of passages to return, an integer >= 1")


class StoreRetriever(_UsesLibrary, BaseRetriever):
    """The ``k`` passages of the store nearest to the query, as Documents with their place in the store."""

    k: int = 4

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        _check_k(self.k)  # after validation: pydantic would wrap the one-line error in its own

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None) -> list[Document]:
        if k is not None:
            _check_k(k)
        return [Document(page_content=passage["text"], metadata={k: v for k, v in passage.items() if k != "text"})
                for passage in self.get_library().passages(query, k or self.k)]


def sources_from(documents: list[Document]) -> list[Source]:
    """Retrieved Documents grouped back into the stored documents they came from, best first."""
    by_doc: dict[str, Source] = {}
    for document in documents:
        meta = document.metadata
        if "doc_id" not in meta:
            raise UserError("a document without metadata['doc_id'] did not come from StoreRetriever")
        score = float(meta.get("score", float("nan")))
        source = by_doc.setdefault(meta["doc_id"], Source(meta["doc_id"], meta.get("source", ""), score))
        source.score = max(source.score, score)
        if "chunk" in meta:
            source.passages.append({**meta, "text": document.page_content})
    return sorted(by_doc.values(), key=lambda s: s.score, reverse=True)


def _cut(text: str, stop: list[str] | None) -> str:
    for marker in stop or []:
        text = text.split(marker)[0]
    return text


class _Answers(_UsesLibrary):
    documents: int = 2
    strategy: str = DEFAULT_STRATEGY
    max_new_tokens: int = 96

    def ask(self, question: str, documents: list[Document] | None, **kwargs) -> Answer:
        sources = sources_from(documents) if documents else None
        return self.get_library().answer(question, documents=self.documents, strategy=self.strategy,
                                         max_new_tokens=self.max_new_tokens, sources=sources, **kwargs)


class ChatExtensible(_Answers, BaseChatModel):
    """Chat model: answers the last human message from the extensible embeddings of the library's documents."""

    @property
    def _llm_type(self) -> str:
        return "extensible-embedding-chat"

    @property
    def _identifying_params(self) -> dict:
        return {"store": self.store, "window": self.window, "strategy": self.strategy, "documents": self.documents}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, documents: list[Document] | None = None,
                  **kwargs: Any) -> ChatResult:
        questions = [m for m in messages if isinstance(m, HumanMessage)]
        if not questions:
            raise UserError("no human message to answer")
        answer = self.ask(questions[-1].text, documents)
        message = AIMessage(content=_cut(answer.answer, stop), response_metadata=answer.metadata())
        return ChatResult(generations=[ChatGeneration(message=message)])


class ExtensibleLLM(_Answers, LLM):
    """Plain LLM: the prompt is the question; returns the answer only, never the prompt."""

    @property
    def _llm_type(self) -> str:
        return "extensible-embedding"

    def _call(self, prompt: str, stop: list[str] | None = None, run_manager: CallbackManagerForLLMRun | None = None,
              documents: list[Document] | None = None, **kwargs: Any) -> str:
        return _cut(self.ask(prompt, documents).answer, stop)
