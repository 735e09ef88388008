"""Reading documents and turning them into token ids, with errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


# Tokens this frequent in the text at hand are guessable without reading far back: never evidence-only.
COMMON_TOKENS = 1000


def common_tokens(texts, n: int = COMMON_TOKENS) -> set[int]:
    """The ``n`` most frequent token ids over ``texts`` (arrays or tensors of ids)."""
    counts = np.bincount(np.concatenate([np.asarray(t, dtype=np.int64) for t in texts]))
    return set(np.argsort(counts, kind="stable")[max(0, len(counts) - n) :].tolist()) if n > 0 else set()


def evidence_only(target: list[int], evidence: list[int], raw: list[int], common: set[int]) -> list[bool]:
    """Which target tokens only the evidence can tell: in the evidence, but neither in the raw text the LLM reads
    nor earlier in the target, nor among the ``common`` tokens (names and facts first seen in the compressed part)."""
    known = set(raw) | common
    evidence_tokens, marks = set(evidence), []
    for token in target:
        marks.append(token in evidence_tokens and token not in known)
        known.add(token)
    return marks


PLACEHOLDER = "\u0000DOCUMENTS\u0000"


def prompt_parts(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the documents, in the model's chat template when it has one."""
    content = f"{PLACEHOLDER}{question.strip()}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = content + "\n"
    before, after = text.split(PLACEHOLDER)
    encode = lambda part: tokenizer(part, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(before), encode(after)


def chat_tokens(tokenizer, document: str, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The document then the prompt as one user turn, in the model's chat template when it has one, as (the
    template's opening, the rest).

    The opening (system prompt, user turn marker) is read raw in front of everything (the runtime's ``prefix``); the
    document comes next so that its early chunks are the ones compressed and the prompt stays raw."""
    before, after = prompt_parts(tokenizer, prompt)
    body = tokenizer(f"{document.rstrip()}\n\n", add_special_tokens=False)["input_ids"] + after
    return torch.tensor(before, dtype=torch.long), torch.tensor(body, dtype=torch.long)


# A foreign control's donor shares under 20% of the token 8-grams of the text it stands in for: a near copy's rows
# would carry the text's own content.
SHINGLE, MAX_SHARED = 8, 0.2


def shingles(ids: list[int]) -> set[tuple[int, ...]]:
    return {tuple(ids[i : i + SHINGLE]) for i in range(len(ids) - SHINGLE + 1)}


def shared_shingles(a: set, b: set) -> float:
    """The share of the smaller set of 8-grams that the other holds too (|a & b| / min(|a|, |b|)): a donor lying
    inside the document -- or the document inside it -- is the same text, whichever is longer."""
    return len(a & b) / min(len(a), len(b)) if a and b else 0.0
