"""LlamaIndex integration (``pip install -e ".[llamaindex]"``: llama-index-core only): a retriever over the store and
a query engine that answers from the retrieved documents' extensible embeddings, as the LangChain classes do.

    library = Library("out/store")                       # or Library("s3://bucket/library")
    retriever = StoreRetriever(library=library, k=4)      # NodeWithScore: the passage text, doc_id, chunk, span
    engine = ExtensibleQueryEngine(library=library)       # Library.answer with the default planner
    response = engine.query("What does the with statement do?")
    response.response, response.source_nodes, response.metadata["sources"]

The retriever returns the same passages, scores and chunk spans as ``rag.langchain.StoreRetriever`` (both ask
``Library.passages``). The engine's source nodes are the passages its answer read; ``metadata`` carries the strategy,
the sources with the k each was read at, and the input length, as the LangChain chat model's ``response_metadata``.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.response.schema import Response
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from extensible.errors import UserError

from .library import Library
from .plan import DEFAULT_STRATEGY


def _library(library: Library | None, store: str | None, window: int) -> Library:
    if library is None and store is None:
        raise UserError("give library= or store=")
    return library or Library(store, window=window)


def _node(passage: dict) -> NodeWithScore:
    """One passage as a node: its text, and where it is in the store (doc_id, chunk, characters) as metadata."""
    metadata = {key: value for key, value in passage.items() if key not in ("text", "score")}
    node = TextNode(text=passage["text"], id_=f"{passage['doc_id']}:{passage['chunk']}:{passage['char_start']}",
                    metadata=metadata)
    return NodeWithScore(node=node, score=float(passage["score"]))


class StoreRetriever(BaseRetriever):
    """The ``k`` passages of the store nearest to the query, best first."""

    def __init__(self, library: Library | None = None, store: str | None = None, k: int = 4, window: int = 4096,
                 **kwargs: Any):
        if not isinstance(k, int) or k < 1:
            raise UserError(f"StoreRetriever k={k!r}: k is the number of passages to return, an integer >= 1")
        self.library, self.k = _library(library, store, window), k
        super().__init__(**kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [_node(passage) for passage in self.library.passages(query_bundle.query_str, self.k)]


class ExtensibleQueryEngine(CustomQueryEngine):
    """Answers through ``Library.answer``: the retrieved documents read as the planner reads them (by default
    ``graded``: the most relevant chunks compressed, the nearest refined, raw where they fit; ``strategy="rag"``: only
    the nearest passages, raw)."""

    library: Any = None
    store: str | None = None
    window: int = 4096
    documents: int = 2
    strategy: str = DEFAULT_STRATEGY
    max_new_tokens: int = 96

    def custom_query(self, query_str: str) -> Response:
        self.library = _library(self.library, self.store, self.window)
        answer = self.library.answer(query_str, documents=self.documents, strategy=self.strategy,
                                     max_new_tokens=self.max_new_tokens)
        nodes = [_node({"doc_id": source.doc_id, "source": source.source, **passage})
                 for source in answer.sources for passage in source.passages]
        return Response(response=answer.answer, source_nodes=nodes, metadata=answer.metadata())
