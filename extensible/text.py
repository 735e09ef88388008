"""Reading documents and turning them into token ids, with errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); convert it, e.g. iconv -t UTF-8") from None
    if not text.strip():
        raise UserError(f"{path} is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Plain token ids of a document, no special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def chat_tokens(tokenizer, document: str, prompt: str) -> torch.Tensor:
    """The document then the prompt as one user turn, in the model's chat template when it has one.

    The document comes first so that its early chunks are the ones compressed and the question stays raw.
    """
    content = f"{document.rstrip()}\n\n{prompt}"
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        return torch.tensor(ids, dtype=torch.long)
    return tokenize(tokenizer, content + "\n")
