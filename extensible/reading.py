"""Training the plug-in so that only a document's content lowers the loss: samples whose evidence exists only
compressed, read by the frozen LLM, with the LLM reading the same evidence raw as the teacher.

A sample is ``before`` (raw tokens, e.g. the chat template's opening), ``evidence`` (chunks: the student reads their
down-scaled rows, the teacher their plain tokens), ``after`` (raw tokens: e.g. the question and the assistant turn)
and ``target`` (the tokens scored: an answer, a continuation, or the evidence itself for reconstruction). No raw copy
of the evidence is anywhere in the student's input, so the loss can fall only through what the rows carry -- or
through a learned prompt, which the third term cancels:

* ``ce``: next-token loss of the target after the student's input;
* ``distill``: KL(teacher || student) on the target positions, the teacher being the same frozen LLM reading the
  evidence raw (what the text itself tells the LLM, token by token);
* ``contrast``: ``max(0, margin + nll(own rows) - nll(foreign rows))`` per sample, where the foreign rows are the
  next sample's evidence rows (another document) at the same k and positions: a prompt that helps whatever the rows
  come from helps both readings alike and cancels. Its gradient also reaches the foreign reading, and making other
  documents' rows misleading widens the gap as well as reading the own ones better does (runs/smollm2-read-c128-e);
  ``contrast_own_only`` takes the foreign NLL as a fixed target so that only the own reading can move.

A sample's ``weights`` (one per target token) weigh all three terms, e.g. to put the loss on the tokens that only
the evidence can tell (``extensible.text.evidence_only``).

The metrics are the foreign control of eval-ppl and eval-qa measured on the training stream: ``own_minus_foreign``
below zero means the rows carry their document (``focus_own_minus_foreign``: on the tokens weighted above 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .downscale import downscale_chunk, num_kept


@dataclass
class ReadingSample:
    before: list[int]
    evidence: list[list[int]]  # chunks of at most chunk_size tokens, in document order
    after: list[int]
    target: list[int]
    weights: list[float] | None = None  # per target token (default: all 1), e.g. more on what only the evidence tells


@dataclass
class ReadingWeights:
    ce: float = 1.0
    distill: float = 1.0
    contrast: float = 0.0
    margin: float = 0.1
    contrast_own_only: bool = False  # the foreign NLL as a fixed target: the hinge cannot push it up


def logits_at(llm, inputs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits at positions (rows, cols) of a right-padded batch ``inputs`` [N, T, H] through the frozen LLM.

    Right padding under a causal mask: no real position ever sees a pad, so no padding mask is needed, and attention
    keeps the fast causal kernel instead of the masked one."""
    hidden = llm.get_decoder()(inputs_embeds=inputs, use_cache=False).last_hidden_state
    return llm.get_output_embeddings()(hidden[rows.to(hidden.device), cols.to(hidden.device)])


def _batch(sequences: list[list[torch.Tensor]], targets: list[list[int]]):
    """Right-padded inputs and the (rows, cols) predicting each target token: a target's first token is predicted
    at the position right before it."""
    inputs = torch.nn.utils.rnn.pad_sequence([torch.cat(parts) for parts in sequences], batch_first=True)
    rows, cols = [], []
    for row, (parts, target) in enumerate(zip(sequences, targets)):
        first = sum(len(p) for p in parts) - (len(target) - 1) - 1
        rows.append(torch.full((len(target),), row))
        cols.append(torch.arange(first, first + len(target)))
    return inputs, torch.cat(rows), torch.cat(cols)


def encode_evidence(embedder, samples: list[ReadingSample], chunk_size: int, device) -> list[list[torch.Tensor]]:
    """Full-resolution outputs of every evidence chunk, all chunks as one batch. A short chunk is right-padded: the
    embedder is causal, so its real rows never see the pad."""
    chunks = [chunk for sample in samples for chunk in sample.evidence]
    ids = torch.zeros((len(chunks), chunk_size), dtype=torch.long)
    for i, chunk in enumerate(chunks):
        ids[i, : len(chunk)] = torch.tensor(chunk)
    outputs = embedder(ids.to(device))
    flat = [outputs[i, : len(chunk)] for i, chunk in enumerate(chunks)]
    per_sample, start = [], 0
    for sample in samples:
        per_sample.append(flat[start : start + len(sample.evidence)])
        start += len(sample.evidence)
    return per_sample


def foreign_rows(own: list[torch.Tensor], donor: list[torch.Tensor], k: int, method: str) -> list[torch.Tensor]:
    """The donor's rows in the own chunks' slots: chunk j takes the donor's chunk j mod n at the same k, cut (or, for
    a longer own chunk, filled with the donor's last row) to the number of rows chunk j keeps."""
    rows = []
    for j, chunk in enumerate(own):
        taken = downscale_chunk(donor[j % len(donor)], k, method, chunk_index=j)
        need = num_kept(len(chunk), k)
        if len(taken) < need:
            taken = torch.cat([taken, taken[-1:].expand(need - len(taken), -1)])
        rows.append(taken[:need])
    return rows


def _nll(llm, sequences: list[list[torch.Tensor]], targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the target positions of each sequence and the per-token NLL of its target."""
    inputs, rows, cols = _batch(sequences, targets)
    logits = logits_at(llm, inputs, rows, cols).float()
    ids = torch.cat([torch.tensor(t) for t in targets]).to(logits.device)
    return logits, F.cross_entropy(logits, ids, reduction="none")


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum()


def _per_sample(nll: torch.Tensor, weights: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """Each sample's weighted mean over its target tokens."""
    sizes = [len(t) for t in targets]
    return torch.stack([_weighted_mean(n, w) for n, w in zip(nll.split(sizes), weights.split(sizes))])


def reading_loss(llm, embedder, samples: list[ReadingSample], ks: list[int], chunk_size: int,
                 weights: ReadingWeights, method: str = "strided") -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss of a batch of samples (one k each) and its measurements (nats per target token). The
    foreign reading is always measured (without gradients when its weight is 0)."""
    embed = llm.get_input_embeddings()
    device, dtype = embed.weight.device, embed.weight.dtype
    tokens = lambda ids: embed(torch.tensor(ids, dtype=torch.long, device=device))  # noqa: E731
    outputs = encode_evidence(embedder, samples, chunk_size, device)
    targets = [sample.target for sample in samples]
    weights_of = torch.tensor([w for s in samples for w in (s.weights or [1.0] * len(s.target))], device=device)
    frames = [(tokens(s.before), tokens(s.after), tokens(s.target[:-1])) for s in samples]

    def inputs(rows_of) -> list[list[torch.Tensor]]:
        return [[f[0], *[r.to(dtype) for r in rows_of(b)], f[1], f[2]] for b, f in enumerate(frames)]

    own = inputs(lambda b: [downscale_chunk(c, ks[b], method, chunk_index=j) for j, c in enumerate(outputs[b])])
    foreign = inputs(lambda b: foreign_rows(outputs[b], outputs[(b + 1) % len(samples)], ks[b], method)) \
        if len(samples) > 1 else []
    contrast = weights.contrast > 0 and foreign
    logits, nll = _nll(llm, own + (foreign if contrast else []), targets * (2 if contrast else 1))
    own_tokens = sum(len(t) for t in targets)
    own_nll = _per_sample(nll[:own_tokens], weights_of, targets)
    loss = weights.ce * _weighted_mean(nll[:own_tokens], weights_of)
    ones = torch.ones_like(weights_of)  # the measurements stay unweighted: comparable across runs
    metrics = {"own_nll": _per_sample(nll[:own_tokens].detach(), ones, targets).mean().item()}
    if foreign:
        if contrast:
            foreign_token_nll = nll[own_tokens:]
        else:
            with torch.no_grad():
                foreign_token_nll = _nll(llm, foreign, targets)[1]
        foreign_nll = _per_sample(foreign_token_nll, weights_of, targets)
        gap = own_nll - foreign_nll  # what the rows' content adds (negative = it helps)
        token_gap = (nll[:own_tokens] - foreign_token_nll).detach()
        metrics["own_minus_foreign"] = _per_sample(token_gap, ones, targets).mean().item()
        if (focused := weights_of > 1).any():
            metrics["focus_own_minus_foreign"] = token_gap[focused].mean().item()
        if contrast:
            hinge_gap = own_nll - foreign_nll.detach() if weights.contrast_own_only else gap
            loss = loss + weights.contrast * torch.relu(weights.margin + hinge_gap).mean()
    if weights.distill > 0:
        with torch.no_grad():
            teacher = [[f[0], tokens([t for chunk in s.evidence for t in chunk]), f[1], f[2]]
                       for s, f in zip(samples, frames)]
            teacher_logits, teacher_nll = _nll(llm, teacher, targets)
            teacher_logprobs = torch.log_softmax(teacher_logits, dim=-1)
        student_logprobs = torch.log_softmax(logits[:own_tokens], dim=-1)
        kl = _weighted_mean(F.kl_div(student_logprobs, teacher_logprobs, log_target=True, reduction="none").sum(-1),
                            weights_of)
        loss = loss + weights.distill * kl
        metrics.update(kl=kl.item(), teacher_nll=teacher_nll.mean().item())
    return loss, metrics
