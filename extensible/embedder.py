"""The extensible embedder: the first N layers of the downstream LLM, run on each chunk on its own.

It is the LLM's own decoder class (``AutoModel.from_config`` with fewer layers, no patched modeling code). Its
token embedding table is the LLM's own, shared and frozen. The decoder's final RMSNorm becomes the output norm: it
is initialised to the RMS of the token embeddings so that the outputs start at the scale the LLM expects from its
inputs, and it is trained with the rest.

A plug-in checkpoint (``save_pretrained``) holds only the tensors that train -- every layer for full fine-tuning,
the LoRA matrices for LoRA, and the output norm -- plus a JSON config with the base LLM's fingerprint. Loading
rebuilds the embedder from the LLM in hand and refuses an incompatible one.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel

from .errors import IncompatiblePluginError, UserError
from .models import base_fingerprint, fingerprint_mismatch, model_name

CONFIG_NAME = "extensible_config.json"
WEIGHTS_NAME = "embedder.safetensors"
SCHEMA_VERSION = 1
ROW_BASES = ("hidden", "token")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class EmbedderConfig:
    num_layers: int = 8
    chunk_size: int = 512
    train_ks: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32])
    downscale: str = "strided"
    lora_rank: int | None = None  # None: full fine-tuning of the N layers
    lora_alpha: int | None = None
    row_mlp: int = 0  # width of a residual MLP on every output row (0: none); zero-initialised, so it starts as identity
    # what the row MLP's output is added to: "hidden" (the last layer's row) or "token" (the LLM's own embedding
    # of the row's token, so that a fresh plug-in's rows are the kept tokens themselves, which the frozen LLM reads)
    row_base: str = "hidden"
    base: dict = field(default_factory=dict)  # fingerprint of the base LLM, filled in by from_llm
    base_name: str = ""
    trained_steps: int = 0
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: dict) -> EmbedderConfig:
        # Forward compatible: keys from a newer schema are ignored rather than fatal.
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})

    @classmethod
    def read(cls, folder: str | Path) -> EmbedderConfig:
        """The config stored in a plug-in folder."""
        return cls.from_dict(json.loads((Path(folder) / CONFIG_NAME).read_text()))


def _token_embedding_rms(llm: PreTrainedModel) -> float:
    weight = llm.get_input_embeddings().weight
    return weight.detach().float().pow(2).mean().sqrt().item()


class RowMLP(nn.Module):
    """o + W2 gelu(W1 o) on each output row: a cheap map from the embedder's last layer to what the frozen LLM reads
    well as context. W2 starts at zero, so a new MLP changes nothing until it trains."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.up = nn.Linear(hidden, width)
        self.down = nn.Linear(width, hidden)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def delta(self, rows: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(rows)))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows + self.delta(rows)


class ExtensibleEmbedder(nn.Module):
    def __init__(self, body: PreTrainedModel, config: EmbedderConfig):
        super().__init__()
        self.body = body
        self.config = config
        hidden = body.config.hidden_size
        self.row_mlp = RowMLP(hidden, config.row_mlp).to(body.norm.weight.device, body.norm.weight.dtype) \
            if config.row_mlp else None

    @classmethod
    def from_llm(cls, llm: PreTrainedModel, tokenizer, config: EmbedderConfig | None = None) -> ExtensibleEmbedder:
        """A fresh (untrained) embedder: a copy of the LLM's first ``num_layers`` layers."""
        config = copy.deepcopy(config) if config is not None else EmbedderConfig()
        total = llm.config.num_hidden_layers
        if not 1 <= config.num_layers <= total:
            raise UserError(f"the embedder needs 1..{total} layers of this LLM, got {config.num_layers}")
        if config.row_base not in ROW_BASES:
            raise UserError(f"row_base must be one of {', '.join(ROW_BASES)}, got {config.row_base!r}")
        if config.row_base == "token" and not config.row_mlp:
            raise UserError("row_base 'token' needs a row MLP (--row-mlp > 0): it is what adds the chunk to the token")
        config.base = base_fingerprint(llm, tokenizer)
        config.base_name = model_name(llm)

        body_config = copy.deepcopy(llm.config)
        body_config.num_hidden_layers = config.num_layers
        if getattr(body_config, "layer_types", None):
            body_config.layer_types = body_config.layer_types[: config.num_layers]
        dtype = llm.get_input_embeddings().weight.dtype
        body = AutoModel.from_config(body_config, dtype=dtype, attn_implementation=llm.config._attn_implementation)
        decoder = llm.get_decoder()
        for mine, theirs in zip(body.layers, decoder.layers):
            mine.load_state_dict(theirs.state_dict())
        body.set_input_embeddings(llm.get_input_embeddings())  # shared with the LLM, frozen
        with torch.no_grad():
            body.norm.weight.fill_(_token_embedding_rms(llm))
        body.to(llm.device)

        embedder = cls(body, config)
        if config.lora_rank:
            inject_adapter_in_model(
                LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or 2 * config.lora_rank,
                           target_modules=list(LORA_TARGETS), lora_dropout=0.0),
                body,
            )
            body.to(llm.device)
        embedder._set_trainable()
        return embedder

    def _set_trainable(self) -> None:
        if self.row_mlp is not None:
            self.row_mlp.requires_grad_(True)
        for name, param in self.body.named_parameters():
            if name.startswith("embed_tokens."):
                param.requires_grad_(False)  # the LLM's own table: frozen
            elif self.config.lora_rank:
                param.requires_grad_("lora_" in name or name.startswith("norm."))
            else:
                param.requires_grad_(True)

    @property
    def device(self) -> torch.device:
        return self.body.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.body.norm.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, L] token ids of chunks -> [batch, L, hidden] output embeddings (o_j sees tokens 1..j)."""
        rows = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if self.row_mlp is None:
            return rows
        if self.config.row_base == "token":
            return self.body.get_input_embeddings()(input_ids) + self.row_mlp.delta(rows)
        return self.row_mlp(rows)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a plug-in holds: the body's trainable ones by their names, the row MLP's under ``row_mlp.``."""
        tensors = {name: param.detach() for name, param in self.body.named_parameters() if param.requires_grad}
        if self.row_mlp is not None:
            tensors.update({f"row_mlp.{name}": param.detach() for name, param in self.row_mlp.named_parameters()})
        return tensors

    def num_trainable(self) -> int:
        return sum(t.numel() for t in self.trainable_state_dict().values())

    def save_pretrained(self, path: str | Path) -> Path:
        """Writes extensible_config.json and embedder.safetensors (the trainable tensors only)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.contiguous().clone().cpu() for name, t in self.trainable_state_dict().items()}
        save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, llm: PreTrainedModel, tokenizer) -> ExtensibleEmbedder:
        path = Path(path)
        if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
            raise UserError(f"{path} is not an extensible-embedding plug-in (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        config = EmbedderConfig.read(path)
        if config.schema_version > SCHEMA_VERSION:
            raise UserError(f"{path} uses plug-in schema {config.schema_version}; upgrade extensible-embedding")
        problems = fingerprint_mismatch(config.base, base_fingerprint(llm, tokenizer))
        if problems:
            raise IncompatiblePluginError(
                f"plug-in {path} was trained for another LLM ({config.base_name or 'unknown'}): " + "; ".join(problems)
            )
        embedder = cls.from_llm(llm, tokenizer, config)
        problem = embedder.load_trainable(load_file(path / WEIGHTS_NAME, device=str(embedder.device)))
        if problem:  # never run a half-loaded plug-in silently
            raise UserError(f"plug-in {path} does not match its config: {problem}")
        embedder.config = config
        return embedder

    def load_trainable(self, stored: dict[str, torch.Tensor], fresh_row_mlp: bool = False) -> str | None:
        """Copies ``stored`` into the trainable tensors; returns what does not match instead (then nothing is copied).

        ``fresh_row_mlp``: ``stored`` may lack the row MLP (a warm start from a plug-in without one), which then keeps
        its identity initialisation."""
        trainable = self.trainable_state_dict()  # detached views: copying into them fills the parameters
        if fresh_row_mlp and not any(name.startswith("row_mlp.") for name in stored):
            trainable = {name: t for name, t in trainable.items() if not name.startswith("row_mlp.")}
        missing, unexpected = sorted(set(trainable) - set(stored)), sorted(set(stored) - set(trainable))
        if missing or unexpected:
            return f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        for name, param in trainable.items():
            if stored[name].shape != param.shape:
                return f"{name} has shape {tuple(stored[name].shape)}, expected {tuple(param.shape)}"
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(stored[name])
        return None
