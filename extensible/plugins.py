"""Finding the embedder for an LLM: an explicit plug-in, a shipped one for this base, or a fresh copy of its layers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .embedder import CONFIG_NAME, EmbedderConfig, ExtensibleEmbedder
from .models import base_fingerprint, load_llm
from .runtime import ExtensibleLM

SHIPPED = Path(__file__).parent / "shipped"  # trained plug-ins that ship with the package
log = logging.getLogger(__name__)


def shipped_plugin(llm, tokenizer) -> Path | None:
    """The plug-in shipped in this package whose base fingerprint matches ``llm``, if any."""
    fingerprint = base_fingerprint(llm, tokenizer)
    for config_path in sorted(SHIPPED.glob(f"*/{CONFIG_NAME}")):
        if json.loads(config_path.read_text()).get("base") == fingerprint:
            return config_path.parent
    return None


def load_embedder(llm, tokenizer, plugin: str | Path | None = None, config: EmbedderConfig | None = None,
                  untrained: bool = False) -> ExtensibleEmbedder:
    """``plugin`` if given; else the shipped plug-in for this LLM; else (or with ``untrained``) a fresh copy."""
    if plugin is not None:
        return ExtensibleEmbedder.from_pretrained(plugin, llm, tokenizer)
    found = None if untrained else shipped_plugin(llm, tokenizer)
    if found is not None:
        return ExtensibleEmbedder.from_pretrained(found, llm, tokenizer)
    log.warning("no trained plug-in for this LLM: using an untrained embedder (its first layers, copied)")
    return ExtensibleEmbedder.from_llm(llm, tokenizer, config)


def load_extensible(model: str | None = None, plugin: str | Path | None = None, window: int | None = None,
                    chunk_size: int | None = None, untrained: bool = False, num_layers: int | None = None,
                    **runtime_kwargs) -> ExtensibleLM:
    """One call from names to a ready runtime: the frozen LLM, its embedder, and the window.

    ``num_layers`` and ``chunk_size`` shape a fresh embedder; ``chunk_size`` also overrides a plug-in's.
    """
    llm, tokenizer = load_llm(model)
    config = EmbedderConfig()
    config.num_layers = num_layers or config.num_layers
    config.chunk_size = chunk_size or config.chunk_size
    embedder = load_embedder(llm, tokenizer, plugin, config, untrained)
    if chunk_size and chunk_size != embedder.config.chunk_size:
        embedder.config.chunk_size = chunk_size  # inference may use another chunk length than training did
    return ExtensibleLM(llm, tokenizer, embedder, window=window, **runtime_kwargs)
