"""The frozen LLM reading [extensible embeddings of earlier chunks] + [token embeddings of the recent tokens].

``ExtensibleLM`` scores and generates in either mode:

* online: the embedder runs on the chunks as they are needed (``full=None``);
* offline: ``full`` holds the precomputed full-resolution outputs of the document (``encode``), and any k is
  sampled from it without running the embedder again.

Which chunks are compressed is decided by ``layout.Layout`` from the context length alone, so both modes, and the
streaming ``OnlineSession``, give the LLM the same input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from .downscale import METHODS, downscale_chunk
from .embedder import ExtensibleEmbedder
from .errors import ContextTooLongError, UserError
from .layout import Layout


@dataclass
class Score:
    """Negative log-likelihood of a target span, token by token."""

    token_nll: torch.Tensor  # [tokens], float32, nats

    @property
    def tokens(self) -> int:
        return int(self.token_nll.numel())

    @property
    def nll(self) -> float:
        return float(self.token_nll.sum())

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)


def as_token_tensor(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.ndim != 1:
        raise UserError(f"expected a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    return ids


class ExtensibleLM:
    def __init__(
        self,
        llm: PreTrainedModel,
        tokenizer,
        embedder: ExtensibleEmbedder,
        window: int | None = None,
        method: str | None = None,
        policy: str = "sliding",
        seed: int = 0,
        encode_batch: int = 8,
    ):
        positions = llm.config.max_position_embeddings
        self.window = window or min(4096, positions)
        if self.window > positions:
            raise UserError(f"window {self.window} exceeds the LLM's {positions} positions; use --window <= {positions}")
        self.method = method or embedder.config.downscale
        if self.method not in METHODS:
            raise UserError(f"unknown down-scaling method {self.method!r}; choose one of {', '.join(METHODS)}")
        if any(p.requires_grad for p in llm.parameters()):
            raise UserError("the downstream LLM must be frozen (extensible.models.freeze)")
        self.llm, self.tokenizer, self.embedder = llm, tokenizer, embedder
        self.policy, self.seed, self.encode_batch = policy, seed, encode_batch

    @property
    def chunk_size(self) -> int:
        return self.embedder.config.chunk_size

    @property
    def max_k(self) -> int:
        """The coarsest k the plug-in was trained at (at most a chunk's length), the planner's default: a coarser k
        gives the LLM rows it never learned to read."""
        return min(max(self.embedder.config.train_ks), self.chunk_size)

    @property
    def device(self) -> torch.device:
        return self.llm.device

    def layout(self, k: int, reserved: int = 0) -> Layout:
        """The layout of what is left of the window once ``reserved`` positions (a raw prefix) are taken."""
        return Layout(self.window - reserved, self.chunk_size, k, self.policy)

    # ---- the embedder side -------------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """[n_chunks, L] ids -> [n_chunks, L, hidden] outputs, in batches."""
        parts = [
            self.embedder(chunks[i : i + self.encode_batch].to(self.embedder.device))
            for i in range(0, len(chunks), self.encode_batch)
        ]
        return torch.cat(parts) if parts else chunks.new_zeros((0, chunks.shape[1], self.hidden_size))

    @property
    def hidden_size(self) -> int:
        return self.llm.config.hidden_size

    @torch.no_grad()
    def iter_encode(self, ids, progress: bool = False):
        """Full-resolution outputs of every chunk (a last partial chunk too), in token order, a batch at a time."""
        ids = as_token_tensor(ids)
        size = self.chunk_size
        complete = len(ids) // size
        for start in tqdm(range(0, complete, self.encode_batch), desc="embedding chunks", disable=not progress):
            stop = min(start + self.encode_batch, complete)
            yield self._encode_chunks(ids[start * size : stop * size].view(-1, size)).flatten(0, 1)
        if len(ids) % size:
            yield self._encode_chunks(ids[complete * size :][None])[0]

    def encode(self, ids, progress: bool = False) -> torch.Tensor:
        """Full-resolution outputs ``[n_tokens, hidden]`` of a whole document (offline mode's input)."""
        rows = list(self.iter_encode(ids, progress))
        return torch.cat(rows) if rows else torch.zeros((0, self.hidden_size), dtype=self.embedder.dtype)

    def extensible_embeddings(self, ids: torch.Tensor, chunks: int, k: int, full=None) -> torch.Tensor:
        """Down-scaled embeddings ``[m, hidden]`` of the first ``chunks`` chunks.

        Rows come from ``full`` (offline: precomputed outputs, tensor or array) where it covers a chunk; the
        embedder runs only on chunks it does not cover (online mode, or tokens generated after the document).
        """
        size = self.chunk_size
        if getattr(full, "chunk_size", size) != size:
            raise UserError(f"the stored outputs were cut into {full.chunk_size}-token chunks, this runtime uses {size}")
        stored = 0 if full is None else min(chunks, len(full) // size)
        kept = [torch.zeros((0, self.hidden_size), dtype=self.llm.dtype, device=self.device)]
        if stored and hasattr(full, "downscaled"):  # a stored document reads only the rows it needs
            kept.append(torch.from_numpy(np.asarray(full.downscaled(stored, k, self.method, self.seed))))
        elif stored:
            part = full[: stored * size]
            rows = (part if torch.is_tensor(part) else torch.from_numpy(np.asarray(part))).view(stored, size, -1)
            kept += [downscale_chunk(rows[i], k, self.method, self.seed, i) for i in range(stored)]
        if chunks > stored:
            rows = self._encode_chunks(ids[stored * size : chunks * size].view(-1, size))
            kept += [downscale_chunk(rows[j], k, self.method, self.seed, stored + j) for j in range(chunks - stored)]
        return torch.cat([part.to(self.device, self.llm.dtype) for part in kept])

    # ---- the LLM side ------------------------------------------------------------------------------------------

    def inputs_embeds(self, ex: torch.Tensor, raw_ids: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """[1, p + m + r, hidden]: the raw prefix's tokens (e.g. a chat template's opening), the extensible
        embeddings, then the recent tokens' own embeddings."""
        embed = self.llm.get_input_embeddings()
        tokens = embed(raw_ids.to(self.device))
        parts = [ex.to(tokens.dtype), tokens]
        if prefix is not None and len(prefix):
            parts.insert(0, embed(prefix.to(self.device)))
        return torch.cat(parts)[None]

    @torch.no_grad()
    def _logprobs(self, embeds: torch.Tensor, keep: int, cache: DynamicCache | None = None) -> torch.Tensor:
        """Log-probabilities at the last ``keep`` positions of ``embeds`` (read after ``cache`` when given)."""
        logits = self.llm(inputs_embeds=embeds, cache=cache, use_cache=cache is not None, logits_to_keep=keep).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def _check_target(self, n: int, target_len: int) -> None:
        if target_len < 1:
            raise UserError(f"the target span must be at least 1 token, got {target_len}")
        if n <= target_len:
            raise UserError(f"the text has {n} tokens; it needs more than the {target_len}-token target")

    @torch.no_grad()
    def score(self, ids, target_len: int, k: int, full=None, prefix=None) -> Score:
        """NLL of the last ``target_len`` tokens, each predicted from the context the online session holds then;
        ``prefix`` (token ids) is read raw in front of it all and never compressed."""
        ids = as_token_tensor(ids)
        prefix = as_token_tensor(prefix if prefix is not None else [])
        n = len(ids)
        self._check_target(n, target_len)
        layout = self.layout(k, len(prefix))
        losses = []
        target = n - target_len  # index of the next token to score; its context is ids[:target]
        layout.compressed_chunks(n - 1)  # fail early, before any work, if the context cannot fit
        while target < n:
            chunks = layout.compressed_chunks(target)
            last = min(n - 1, layout.limit(chunks))  # the last target predicted in this state
            ex = self.extensible_embeddings(ids, chunks, k, full)
            raw = ids[chunks * self.chunk_size : last]
            logprobs = self._logprobs(self.inputs_embeds(ex, raw, prefix), keep=last - target + 1)
            expected = ids[target : last + 1].to(logprobs.device)
            losses.append(-logprobs.gather(1, expected[:, None])[:, 0].cpu())
            target = last + 1
        return Score(torch.cat(losses))

    @torch.no_grad()
    def score_window(self, ids, target_len: int) -> Score:
        """Baseline: the LLM alone on the last ``window`` tokens."""
        ids = as_token_tensor(ids)
        n = len(ids)
        self._check_target(n, target_len)
        if target_len > self.window:
            raise UserError(f"the target ({target_len} tokens) must fit the window ({self.window}); lower --tail")
        context = ids[max(0, n - 1 - self.window) : n - 1]
        logprobs = self._logprobs(self.inputs_embeds(context.new_zeros((0, self.hidden_size)), context), target_len)
        expected = ids[n - target_len :].to(logprobs.device)
        return Score(-logprobs.gather(1, expected[:, None])[:, 0].cpu())

    @torch.no_grad()
    def generate(self, ids, k: int, max_new_tokens: int = 64, full=None, prefix=None, **generate_kwargs) -> list[int]:
        """Greedy (by default) continuation of ``ids``; crosses session boundaries as the online mode does.
        ``prefix`` (token ids) is read raw in front of it all and never compressed."""
        ids = as_token_tensor(ids)
        prefix = as_token_tensor(prefix if prefix is not None else [])
        layout = self.layout(k, len(prefix))
        eos = self.llm.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id or next(iter(eos), 0))
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        layout.compressed_chunks(len(ids) + max_new_tokens - 1)  # fail before generating if the answer cannot fit
        new: list[int] = []
        while len(new) < max_new_tokens:
            chunks = layout.compressed_chunks(len(ids))
            count = min(max_new_tokens - len(new), layout.limit(chunks) - len(ids) + 1)
            embeds = self.inputs_embeds(self.extensible_embeddings(ids, chunks, k, full), ids[chunks * self.chunk_size :],
                                        prefix)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=count, **generate_kwargs)
            tokens = out[0].tolist()
            stop = next((i for i, t in enumerate(tokens) if t in eos), None)
            tokens = tokens if stop is None else tokens[: stop + 1]
            new += tokens
            ids = torch.cat([ids, torch.tensor(tokens, dtype=torch.long)])
            if stop is not None:
                break
        return new

    def compose(self, segments) -> torch.Tensor:
        """[1, n, hidden] LLM input from segments in order: 1-D token ids (read as tokens) or [m, hidden] extensible
        embeddings (read as they are), e.g. a prompt, then several documents' embeddings, then a question."""
        parts = []
        for segment in segments:
            segment = torch.as_tensor(segment)
            if segment.ndim == 1:
                parts.append(self.llm.get_input_embeddings()(segment.long().to(self.device)))
            elif segment.ndim == 2 and segment.shape[1] == self.hidden_size:
                parts.append(segment.to(self.device, self.llm.dtype))
            else:
                raise UserError(f"a segment must be token ids or [m, {self.hidden_size}] embeddings, got {tuple(segment.shape)}")
        return torch.cat(parts)[None]

    @torch.no_grad()
    def generate_embeds(self, embeds: torch.Tensor, max_new_tokens: int = 64, **generate_kwargs) -> list[int]:
        """Greedy (by default) answer to a composed input that, with the answer, must fit the window."""
        if embeds.shape[1] + max_new_tokens > self.window:
            raise ContextTooLongError(f"the input ({embeds.shape[1]} positions) and the answer ({max_new_tokens} tokens) "
                                      f"exceed the window of {self.window}")
        eos = self.llm.generation_config.eos_token_id
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id or (eos[0] if isinstance(eos, list) else eos))
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, **generate_kwargs)
        return out[0].tolist()

    @torch.no_grad()
    def prefix_cache(self, embeds: torch.Tensor) -> DynamicCache:
        """The KV cache of a composed input, so that many continuations of it are scored at the cost of their own
        tokens (e.g. every question about one document read as a whole)."""
        return self.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).cache

    @torch.no_grad()
    def score_continuation(self, embeds: torch.Tensor, target_ids, prefix: DynamicCache | None = None) -> Score:
        """Teacher-forced NLL of ``target_ids`` read right after the composed input ``embeds`` ([1, n, hidden]). With
        ``prefix`` (the cache of an input that ``embeds`` continues), only ``embeds`` and the target are run."""
        target = as_token_tensor(target_ids).to(self.device)
        if len(target) < 1:
            raise UserError("the target to score is empty")
        past = prefix.get_seq_length() if prefix is not None else 0
        # a cached prefix is full attention over a whole document: bounded by the model's positions, not the window
        limit = self.llm.config.max_position_embeddings if prefix is not None else self.window
        if past + embeds.shape[1] + len(target) > limit:
            raise ContextTooLongError(f"the input ({past + embeds.shape[1]} positions) and the target ({len(target)} "
                                      f"tokens) exceed {limit} positions")
        inputs = torch.cat([embeds, self.llm.get_input_embeddings()(target[:-1])[None].to(embeds.dtype)], dim=1)
        try:
            logprobs = self._logprobs(inputs, len(target), prefix)
        finally:
            if prefix is not None and prefix.get_seq_length() > past:  # leave the cache as it was for the next one
                prefix.crop(past - prefix.get_seq_length())
        return Score(-logprobs.gather(1, target[:, None])[:, 0].cpu())

    def stream(self, k: int, block: int = 256) -> OnlineSession:
        return OnlineSession(self, k, block)


class OnlineSession:
    """Streaming online mode: tokens arrive, sessions fill the window, full sessions become extensible embeddings.

    Holds at most a window's worth of extensible embeddings, raw tokens and KV cache, however long the stream.
    """

    def __init__(self, lm: ExtensibleLM, k: int, block: int = 256):
        self.lm, self.k, self.block = lm, k, block
        self.layout = lm.layout(k)
        self.seen = 0  # tokens fed so far
        self.chunks = 0  # chunks compressed so far
        self.ex = torch.zeros((0, lm.hidden_size), dtype=lm.llm.dtype, device=lm.device)
        self.raw: list[int] = []  # tokens chunks*chunk_size .. seen-1
        self.cache: DynamicCache | None = None
        self.next_logprobs: torch.Tensor | None = None  # for the token at index `seen`

    @torch.no_grad()
    def feed(self, ids) -> torch.Tensor:
        """Log-probability of each fed token given everything before it (NaN for the stream's first token)."""
        ids = as_token_tensor(ids).tolist()
        result: list[torch.Tensor] = []
        i = 0
        while i < len(ids):
            fit = min(len(ids) - i, self.layout.limit(self.chunks) - self.seen, self.block)
            if fit > 0:  # same session: extend the KV cache
                block = ids[i : i + fit]
                logprobs = self._run(input_ids=torch.tensor([block], device=self.lm.device), keep=fit)
                result.append(self._take(block[0]))
                result.append(logprobs[:-1].gather(1, torch.tensor(block[1:], device=logprobs.device)[:, None])[:, 0].cpu())
                self.next_logprobs = logprobs[-1]
                self.raw += block
                self.seen += fit
                i += fit
                continue
            # The window is full: this token opens the next session.
            result.append(self._take(ids[i]))
            self.raw.append(ids[i])
            self.seen += 1
            i += 1
            self._compress(self.layout.compressed_chunks(self.seen))
            self.cache = None
            embeds = self.lm.inputs_embeds(self.ex, torch.tensor(self.raw, dtype=torch.long))
            for start in range(0, embeds.shape[1], self.block):  # in blocks: attention memory stays block x window
                self.next_logprobs = self._run(inputs_embeds=embeds[:, start : start + self.block], keep=1)[-1]
        return torch.cat(result) if result else torch.zeros(0)

    def _take(self, token: int) -> torch.Tensor:
        if self.next_logprobs is None:
            return torch.tensor([float("nan")])
        return self.next_logprobs[token].reshape(1).cpu()

    def _run(self, keep: int, **inputs) -> torch.Tensor:
        if self.cache is None:
            self.cache = DynamicCache(config=self.lm.llm.config)
        logits = self.lm.llm(**inputs, past_key_values=self.cache, use_cache=True, logits_to_keep=keep).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def _compress(self, chunks: int) -> None:
        size, new = self.lm.chunk_size, chunks - self.chunks
        tokens = torch.tensor(self.raw[: new * size], dtype=torch.long).view(new, size)
        outputs = self.lm._encode_chunks(tokens)
        kept = [downscale_chunk(outputs[j], self.k, self.lm.method, self.lm.seed, self.chunks + j) for j in range(new)]
        self.ex = torch.cat([self.ex, *[e.to(self.ex.dtype) for e in kept]])
        self.raw = self.raw[new * size :]
        self.chunks = chunks
