"""extensible-embedding core: the embedder, down-scaling, the frozen-LLM runtime and plug-in checkpoints.

Imports none of pipeline/, storage/, rag/ or jobs/; they import it.
"""

from .downscale import METHODS, downscale_chunk, kept_positions, rows_needed
from .embedder import EmbedderConfig, ExtensibleEmbedder
from .errors import ContextTooLongError, IncompatiblePluginError, UserError
from .layout import Layout, smallest_k
from .models import base_fingerprint, load_llm
from .runtime import ExtensibleLM, OnlineSession, Score

__all__ = [
    "METHODS", "ContextTooLongError", "EmbedderConfig", "ExtensibleEmbedder", "ExtensibleLM",
    "IncompatiblePluginError", "Layout", "OnlineSession", "Score", "UserError", "base_fingerprint",
    "downscale_chunk", "kept_positions", "load_llm", "rows_needed", "smallest_k",
]
