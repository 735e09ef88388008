"""Two-stream auto-regressive training of the extensible embedder on a frozen LLM.

Each sample of ``sample_tokens`` is cut into chunks of ``chunk_size``. Pass 1 runs the embedder on every chunk and
down-scales each chunk's outputs by the sample's k (drawn from ``ks``). Pass 2 predicts every token of chunk i > 0
from the extensible embeddings of chunks < i followed by the tokens of chunk i before it -- all chunks of all samples
as one right-padded batch through the frozen LLM, with logits only where the loss is taken.

``recent_chunks`` R matches training to the sliding layout that inference uses, where the most recent chunks stay raw
tokens between the extensible embeddings and the token being predicted: per sample r is drawn from 0..R, and chunk i
(i > r) is predicted from the embeddings of chunks < i - r, the raw tokens of chunks i - r .. i - 1, and its own
preceding tokens. r = 0 is the paper's objective. The read objective takes it too: r chunks raw between the evidence
and the target, as a long text's scored tokens sit far past its last compressed row.

Extra objectives (``Trainer(..., objectives=lambda trainer: [...])``) add their loss to every step's book loss:
objects with a ``name``, ``settings()`` (recorded in the checkpoint; a resume must agree) and ``loss(llm, embedder)``
drawing samples with the ``random`` module, whose state the checkpoint keeps, and optionally ``metrics`` (a dict of
the last loss's measurements, logged beside it) -- e.g. ``rag.qa_train.QAObjective``,
whose samples are the library's own QA queries. The core knows nothing of them.

Ablation objectives (``objective``): ``autoencode`` (chunk i's tokens from its own embeddings) and ``continuation``
(only the last chunk, from the embeddings of all earlier ones). ``read`` (``extensible.reading``) is the objective
whose loss only content can lower: each sample's earlier chunks are the evidence, read only compressed, and the
target is the first ``target_tokens`` of its last chunk (or, with probability ``reconstruct``, the evidence itself),
with the next-token loss (``ce``), distillation from the LLM reading the evidence raw (``distill``) and a hinge
against another sample's rows at the same k (``contrast``, ``margin``); ``focus`` weighs more the target tokens that
only the evidence tells (``text.evidence_only``). ``val_every`` measures the read objective on documents the run
never trains on (``val_data``): own - foreign at each k, the held-out curve of the content the rows carry. The loop is
nanoGPT-shaped: one readable function, checkpoints with exact resume (plug-in tensors, optimizer, scheduler, RNG, data
position).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .data import PackedTokens, spread_samples
from .downscale import downscale_chunk
from .embedder import WEIGHTS_NAME, EmbedderConfig, ExtensibleEmbedder
from .errors import UserError
from .models import load_llm
from .reading import ReadingSample, ReadingWeights, logits_at, reading_loss
from .text import common_tokens, evidence_only

OBJECTIVES = ("ar", "autoencode", "continuation", "read")
# A resume must agree on these; the rest (steps, save/eval cadence) may change between runs.
SHAPE_FIELDS = ("model", "data", "exclude", "num_layers", "lora_rank", "chunk_size", "sample_tokens", "ks",
                "objective", "downscale", "lr", "warmup", "batch_size", "grad_accum", "seed", "weight_decay",
                "recent_chunks", "init_from", "row_mlp", "row_base", "target_tokens", "reconstruct", "ce", "distill",
                "contrast", "margin", "contrast_own_only", "k_curriculum", "focus")


@dataclass
class TrainConfig:
    data: list[str]
    out: str = "runs/embedder"
    model: str | None = None
    exclude: list[str] = field(default_factory=list)  # file-name fragments held out of training
    num_layers: int = 8
    lora_rank: int | None = None
    chunk_size: int = 256
    sample_tokens: int = 2048
    ks: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32])
    k_curriculum: int = 0  # steps over which the ks open one by one, smallest first (0: all from the start)
    objective: str = "ar"
    recent_chunks: int = 0  # up to this many raw chunks between the compressed context and the predicted chunk
    init_from: str | None = None  # a plug-in folder whose tensors start a new run (warm start)
    downscale: str = "strided"
    row_mlp: int = 0  # width of the embedder's residual MLP on its output rows (0: none)
    row_base: str = "hidden"  # what the row MLP adds to: the last layer's row, or the row's token embedding
    # the read objective (extensible.reading)
    target_tokens: int = 128
    reconstruct: float = 0.0
    ce: float = 1.0
    distill: float = 1.0
    contrast: float = 0.0
    margin: float = 0.1
    contrast_own_only: bool = False  # the hinge's gradient reaches the own reading only
    focus: float = 0.0  # extra weight of the target tokens only the evidence can tell (evidence_only)
    lr: float = 1e-4
    warmup: int = 0
    weight_decay: float = 0.0
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    save_every: int = 25
    log_every: int = 1
    seed: int = 0
    # held-out documents whose read objective is measured every val_every steps (0: never), val_samples from each
    # (as many as the shortest one holds)
    val_data: list[str] = field(default_factory=list)
    val_every: int = 0
    val_samples: int = 4
    # the held-out samples' length (0: sample_tokens): a long text's layout (8W: 104 rows at k = 64, 8 raw chunks,
    # then the target) measured while the run trains on shorter, cheaper samples
    val_tokens: int = 0

    def __post_init__(self):
        # Absolute paths, so that a resume from another working directory is recognised as the same data.
        self.data = [str(Path(d).resolve()) if Path(d).exists() else d for d in self.data]
        self.val_data = [str(Path(d).resolve()) if Path(d).exists() else d for d in self.val_data]
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.sample_tokens % self.chunk_size or self.sample_tokens < 2 * self.chunk_size:
            raise UserError(f"--sample-tokens ({self.sample_tokens}) must be a multiple of --chunk "
                            f"({self.chunk_size}) holding at least two chunks")
        if any(k < 1 or k > self.chunk_size for k in self.ks):
            raise UserError(f"every k must be in 1..{self.chunk_size}, got {self.ks}")
        n_chunks = self.sample_tokens // self.chunk_size
        if not 0 <= self.recent_chunks <= n_chunks - 2:
            raise UserError(f"--recent-chunks must be in 0..{n_chunks - 2} (a sample holds {n_chunks} chunks and "
                            f"needs one compressed and one predicted), got {self.recent_chunks}")
        if self.recent_chunks and self.objective not in ("ar", "read"):
            raise UserError("--recent-chunks applies to the ar and read objectives only")
        if self.row_mlp < 0:
            raise UserError(f"--row-mlp must be >= 0 (0: no row MLP), got {self.row_mlp}")
        if self.objective == "read" and self.contrast and self.batch_size < 2:
            raise UserError("--contrast needs --batch-size >= 2: a sample's foreign rows are another sample's")
        if self.objective == "read" and not 1 <= self.target_tokens <= self.chunk_size:
            raise UserError(f"--target-tokens must be in 1..{self.chunk_size} (the chunk), got {self.target_tokens}")
        if self.k_curriculum < 0:
            raise UserError(f"--k-curriculum must be >= 0 steps, got {self.k_curriculum}")
        if not 0 <= self.reconstruct <= 1 or min(self.ce, self.distill, self.contrast) < 0:
            raise UserError("--reconstruct must be in 0..1 and the loss weights --ce, --distill, --contrast >= 0")
        if self.focus < 0 or (self.focus and self.objective != "read"):
            raise UserError(f"--focus must be >= 0 and applies to the read objective only, got {self.focus}")
        if self.val_every < 0 or self.val_samples < 1:
            raise UserError(f"--val-every must be >= 0 and --val-samples >= 1, got {self.val_every} and "
                            f"{self.val_samples}")
        if self.val_tokens and (self.val_tokens % self.chunk_size
                                or self.val_tokens // self.chunk_size < self.recent_chunks + 2):
            raise UserError(f"--val-tokens ({self.val_tokens}) must be a multiple of --chunk ({self.chunk_size}) "
                            f"holding --recent-chunks + 2 chunks (one compressed, one predicted)")
        if self.val_every and (self.objective != "read" or not self.val_data):
            raise UserError("--val-every measures the read objective on --val-data: it needs --objective read and "
                            "--val-data")
        if self.init_from:
            self.init_from = str(Path(self.init_from).resolve())


class Objective(Protocol):
    """A loss added to every training step, beside the two-stream loss on the books."""

    name: str

    def settings(self) -> dict: ...

    def loss(self, llm, embedder) -> torch.Tensor: ...


def curriculum_ks(ks: list[int], step: int, steps_to_open: int) -> list[int]:
    """The ks drawn at ``step``: the distinct ks open one by one, smallest first, evenly over ``steps_to_open`` steps
    (all of them from the start when it is 0); a repeated k keeps its weight."""
    distinct = sorted(set(ks))
    opened = len(distinct) if not steps_to_open else min(len(distinct), 1 + step * len(distinct) // steps_to_open)
    return [k for k in ks if k <= distinct[opened - 1]]


def pass_two_batch(embedder_outputs: torch.Tensor, token_embeds: torch.Tensor, ids: torch.Tensor, ks: list[int],
                   objective: str, method: str, recent: list[int] | None = None):
    """Builds pass 2: (inputs_embeds [N, T, H], right-padded; loss positions (rows, cols); target ids).

    ``embedder_outputs``/``token_embeds``: [B, n, C, H]; ``ids``: [B, n, C]; ``recent``: raw chunks per sample
    (default 0). The logit at a loss position predicts the target token; the first token of a chunk is predicted
    from the input just before it (the last extensible embedding, or the last raw token of a recent chunk).
    """
    batch, n, size, _ = embedder_outputs.shape
    recent = recent or [0] * batch
    sequences, targets = [], []
    for b in range(batch):
        ex = [downscale_chunk(embedder_outputs[b, i], ks[b], method, chunk_index=i) for i in range(n)]
        r = recent[b]
        if objective == "ar":
            pairs = [(torch.cat(ex[: i - r]), i) for i in range(r + 1, n)]
        elif objective == "continuation":
            pairs = [(torch.cat(ex[: n - 1]), n - 1)]
        else:  # autoencode
            pairs = [(ex[i], i) for i in range(n)]
        for context, i in pairs:
            raw = token_embeds[b, i - r : i].flatten(0, 1)  # the recent chunks (none when r = 0)
            # The chunk's last token is never an input.
            sequences.append((context, torch.cat([raw, token_embeds[b, i, :-1]]), len(raw)))
            targets.append(ids[b, i])
    length = max(len(ctx) + len(tok) for ctx, tok, _ in sequences)
    hidden = embedder_outputs.shape[-1]
    inputs = token_embeds.new_zeros((len(sequences), length, hidden))
    rows, cols = [], []
    for row, (context, tokens, n_raw) in enumerate(sequences):
        m = len(context)
        inputs[row, :m] = context.to(inputs.dtype)
        inputs[row, m : m + len(tokens)] = tokens
        rows.append(torch.full((size,), row))
        cols.append(torch.arange(m + n_raw - 1, m + n_raw - 1 + size))
    return inputs, (torch.cat(rows), torch.cat(cols)), torch.cat(targets)


def two_stream_loss(llm, embedder: ExtensibleEmbedder, ids: torch.Tensor, ks: list[int], chunk_size: int,
                    objective: str = "ar", method: str = "strided", recent: list[int] | None = None) -> torch.Tensor:
    """Mean next-token loss of pass 2 for a batch of samples ``ids`` [B, S] with one k (and r) per sample."""
    batch, total = ids.shape
    n = total // chunk_size
    chunks = ids.view(batch, n, chunk_size)
    outputs = embedder(chunks.reshape(batch * n, chunk_size)).view(batch, n, chunk_size, -1)
    token_embeds = llm.get_input_embeddings()(chunks)
    inputs, (rows, cols), targets = pass_two_batch(outputs.to(token_embeds.dtype), token_embeds, chunks, ks,
                                                   objective, method, recent)
    return padded_batch_loss(llm, inputs, rows, cols, targets)


def padded_batch_loss(llm, inputs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                      targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss of ``targets`` predicted at positions (rows, cols) of a right-padded batch ``inputs``
    [N, T, H] through the frozen LLM, with logits only at those positions: their mean, or each (``"none"``)."""
    logits = logits_at(llm, inputs, rows, cols)
    return F.cross_entropy(logits.float(), targets.to(logits.device), reduction=reduction)


def book_reading_samples(ids: torch.Tensor, chunk_size: int, target_tokens: int, reconstruct: list[bool],
                         recent: list[int] | None = None, focus: float = 0.0,
                         common: set[int] = frozenset()) -> list[ReadingSample]:
    """The read objective's samples from book samples ``ids`` [B, S]: the chunks before the last are the evidence;
    the target is the first ``target_tokens`` of the last chunk, or the evidence itself where ``reconstruct``.
    ``recent`` r per sample keeps the r chunks before the last raw, between the evidence and the target, as the
    sliding layout reads a long text (a reconstruction has none). ``focus`` f weighs the continuation's
    evidence-only tokens 1 + f."""
    samples = []
    for row, again, r in zip(ids.tolist(), reconstruct, recent or [0] * len(reconstruct)):
        chunks = [row[i : i + chunk_size] for i in range(0, len(row), chunk_size)]
        split = len(chunks) - 1 - (0 if again else r)
        evidence, raw = chunks[:split], [t for chunk in chunks[split:-1] for t in chunk]
        evidence_tokens = [t for chunk in evidence for t in chunk]
        target = evidence_tokens if again else chunks[-1][:target_tokens]
        weights = None
        if focus and not again:
            weights = [1.0 + focus * mark for mark in evidence_only(target, evidence_tokens, raw, common)]
        samples.append(ReadingSample([], evidence, raw, target, weights))
    return samples


@dataclass
class BookBatch:
    """A step's book samples and what each one drew."""
    ids: torch.Tensor  # [B, S]
    ks: list[int]
    recent: list[int] | None  # raw chunks between the rows and the predicted text (None without --recent-chunks)
    reconstruct: list[bool]  # the read objective: whether the target is the evidence itself


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def sample_order(n_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_samples)


class Trainer:
    def __init__(self, config: TrainConfig, progress: bool = True, objectives=None):
        """``objectives(trainer)`` gives the extra objectives once the trainer holds its LLM and tokenizer."""
        self.config = config
        self.out = Path(config.out)
        self.progress = progress
        # bf16 autocast on a GPU; fp32 on a CPU, where bf16 matmuls without AVX512-BF16 take a reference kernel
        # (a [512, 49152] x [49152, 576] product: 29 s in bf16, 0.16 s in fp32 on a 2-core AVX2 machine)
        self.accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                                       gradient_accumulation_steps=config.grad_accum)
        self.llm, self.tokenizer = load_llm(config.model, device=self.accelerator.device, progress=progress)
        if config.gradient_checkpointing:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(config.seed)  # LoRA's A and the row MLP start random: the same run starts the same
        self.embedder = ExtensibleEmbedder.from_llm(self.llm, self.tokenizer, EmbedderConfig(
            num_layers=config.num_layers, chunk_size=config.chunk_size, train_ks=list(config.ks),
            downscale=config.downscale, lora_rank=config.lora_rank, row_mlp=config.row_mlp, row_base=config.row_base))
        for param in self.embedder.parameters():  # fp32 master weights (bf16 compute under a GPU's autocast)
            if param.requires_grad:
                param.data = param.data.float()
        self.steps_before = 0  # steps behind a warm start, counted in the plug-in's trained_steps
        if config.init_from:
            # A plug-in without a row MLP warm-starts one that has it: the new MLP starts as identity. So does one
            # whose MLP adds to another base (its MLP maps to the other base's rows): only its body is kept.
            source = EmbedderConfig.read(config.init_from)
            self._load_trainable(Path(config.init_from) / WEIGHTS_NAME, f"--init-from {config.init_from}",
                                 fresh_row_mlp=True, drop_row_mlp=source.row_base != config.row_base)
            self.steps_before = source.trained_steps
        self.data = PackedTokens(self.tokenizer, config.data, config.sample_tokens, self.out / "cache",
                                 exclude=tuple(config.exclude), progress=progress)
        self.common_tokens = common_tokens([self.data.tokens]) if config.focus else set()
        self.held_out: list[ReadingSample] = []  # --val-data's fixed read samples, built once
        if config.val_every:
            ids = spread_samples(self.tokenizer, config.val_data, config.val_tokens or config.sample_tokens,
                                 config.val_samples)
            self.held_out = book_reading_samples(torch.from_numpy(ids), config.chunk_size, config.target_tokens,
                                                 [False] * len(ids), [config.recent_chunks] * len(ids))
        trainable = [p for p in self.embedder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, config.warmup, config.steps)
        # The scheduler stays outside accelerate: prepared, it would step num_processes times per optimizer step
        # (accelerate counts per-process batches), shortening the warm-up and the schedule N times on N processes.
        self.embedder, self.optimizer = self.accelerator.prepare(self.embedder, self.optimizer)
        self.objectives: list[Objective] = objectives(self) if objectives else []
        self.step = 0
        self.samples_seen = 0
        # one random stream per process, so that the processes draw different k, questions and documents
        rank_seed = config.seed + self.accelerator.process_index
        random.seed(rank_seed)
        np.random.seed(rank_seed)
        torch.manual_seed(rank_seed)

    # ---- checkpoints -------------------------------------------------------------------------------------------

    @property
    def latest(self) -> Path:
        return self.out / "checkpoint"

    def save(self) -> None:
        """Atomic: written beside, then renamed over the previous checkpoint."""
        rng = gather_object([_rng_state()])  # every process's random stream, in rank order (all processes call this)
        if not self.accelerator.is_main_process:
            return
        tmp = self.out / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        embedder = self.accelerator.unwrap_model(self.embedder)
        embedder.config.trained_steps = self.steps_before + self.step
        embedder.save_pretrained(tmp / "plugin")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "step": self.step, "samples_seen": self.samples_seen, "rng": rng,
                    "processes": self.accelerator.num_processes}, tmp / "state.pt")
        (tmp / "train_config.json").write_text(json.dumps(self._recorded_config(), indent=2))
        old = self.out / "checkpoint.old"
        if self.latest.exists():
            self.latest.rename(old)
        tmp.rename(self.latest)
        shutil.rmtree(old, ignore_errors=True)

    def _recorded_config(self) -> dict:
        return {**asdict(self.config), "objectives": {o.name: o.settings() for o in self.objectives}}

    def resume(self) -> bool:
        if not self.latest.exists():
            return False
        saved = json.loads((self.latest / "train_config.json").read_text())
        mine = self._recorded_config()
        # A key that an older checkpoint lacks had its default then.
        defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
        defaults["objectives"] = {}
        changed = [f"{key}: {saved.get(key, defaults.get(key))!r} -> {mine[key]!r}"
                   for key in (*SHAPE_FIELDS, "objectives") if saved.get(key, defaults.get(key)) != mine[key]]
        if changed:
            raise UserError(f"{self.latest} belongs to another configuration ({'; '.join(changed)}); "
                            "use another --out or the same settings")
        self._load_trainable(self.latest / "plugin" / WEIGHTS_NAME, f"{self.latest} (use another --out)")
        # weights_only: a checkpoint cannot run code; numpy's RNG state is the only non-tensor object it holds.
        with torch.serialization.safe_globals([np.ndarray, np.dtype, np._core.multiarray._reconstruct,
                                               type(np.dtype(np.uint32))]):
            state = torch.load(self.latest / "state.pt", weights_only=True)
        processes = state.get("processes", 1)  # the data shards and random streams are per process
        if processes != self.accelerator.num_processes:
            raise UserError(f"{self.latest} was trained on {processes} process(es), not "
                            f"{self.accelerator.num_processes}: resume with as many, or use another --out")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        rng = state["rng"]  # a list by rank; a checkpoint from before per-process streams holds one dict
        _set_rng_state(rng[self.accelerator.process_index] if isinstance(rng, list) else rng)
        return True

    def _load_trainable(self, weights: Path, what: str, fresh_row_mlp: bool = False,
                        drop_row_mlp: bool = False) -> None:
        if not weights.exists():
            raise UserError(f"{what}: {weights} not found")
        stored = load_file(weights)
        if drop_row_mlp:
            stored = {name: t for name, t in stored.items() if not name.startswith("row_mlp.")}
        problem = self.accelerator.unwrap_model(self.embedder).load_trainable(stored, fresh_row_mlp)
        if problem:
            raise UserError(f"{what} does not hold this embedder's tensors ({problem}; another LoRA rank, layer count "
                            "or --row-mlp width?)")

    # ---- the loop ----------------------------------------------------------------------------------------------

    def next_batch(self) -> BookBatch:
        """The next book samples and each one's draws."""
        config, world = self.config, self.accelerator.num_processes
        rows = []
        for _ in range(config.batch_size):
            global_index = self.samples_seen * world + self.accelerator.process_index  # shard by rank
            epoch, position = divmod(global_index, len(self.data))
            rows.append(self.data[int(sample_order(len(self.data), config.seed, epoch)[position])])
            self.samples_seen += 1
        ks = [random.choice(self.current_ks()) for _ in rows]
        # Drawn only when asked for, so that runs without them keep their random stream (and exact resume).
        recent = [random.randint(0, config.recent_chunks) for _ in rows] if config.recent_chunks else None
        reconstruct = [random.random() < config.reconstruct for _ in rows] \
            if config.objective == "read" and config.reconstruct else [False] * len(rows)
        return BookBatch(torch.from_numpy(np.stack(rows)).to(self.accelerator.device), ks, recent, reconstruct)

    def current_ks(self) -> list[int]:
        """The ks a sample may draw now (``--k-curriculum``)."""
        return curriculum_ks(self.config.ks, self.step, self.config.k_curriculum)

    def book_loss(self, batch: BookBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss on the book samples and, for the read objective, its measurements (own - foreign, KL, ...)."""
        config = self.config
        if config.objective != "read":
            return two_stream_loss(self.llm, self.embedder, batch.ids, batch.ks, config.chunk_size, config.objective,
                                   config.downscale, batch.recent), {}
        weights = ReadingWeights(config.ce, config.distill, config.contrast, config.margin,
                                 config.contrast_own_only)
        samples = book_reading_samples(batch.ids, config.chunk_size, config.target_tokens, batch.reconstruct,
                                       batch.recent, config.focus, self.common_tokens)
        return reading_loss(self.llm, self.embedder, samples, batch.ks, config.chunk_size, weights, config.downscale)

    def validate(self) -> dict[str, float]:
        """The read objective's measurements on the held-out samples, at each k of ``ks``, with the most raw chunks
        between the rows and the target (where a long text's scored tokens sit) and the continuation as the target
        (never a reconstruction): ``k64_own_minus_foreign`` is the content the rows carry on text the run never trained
        on. Draws nothing at random (exact resume holds)."""
        config, n = self.config, len(self.held_out)
        measured = {}
        with torch.no_grad(), self.accelerator.autocast():
            for k in sorted(set(config.ks)):
                # no teacher: the own and the foreign readings are all it measures
                _, metrics = reading_loss(self.llm, self.embedder, self.held_out, [k] * n, config.chunk_size,
                                          ReadingWeights(distill=0.0), config.downscale)
                measured.update({f"k{k}_{name}": value for name, value in metrics.items()})
        return measured

    def _log_validation(self, writer, bar) -> None:
        measured = self.validate()  # on every process: a wrapped embedder's forward may synchronise them
        if writer is not None:
            for name, value in measured.items():
                writer.add_scalar(f"val/{name}", value, self.step)
            bar.write(f"step {self.step} held out: " + ", ".join(
                f"{name} {value:+.4f}" for name, value in measured.items() if name.endswith("minus_foreign")))

    def train(self, until: int | None = None, max_minutes: float | None = None) -> dict:
        """Trains to ``config.steps``; stops early (with a checkpoint) at step ``until`` or after ``max_minutes``.

        The summary's ``finished`` is False when ``max_minutes`` stopped it before its last step."""
        from torch.utils.tensorboard import SummaryWriter

        config = self.config
        resumed = self.resume()
        writer = SummaryWriter(self.out / "tb") if self.accelerator.is_main_process else None
        bar = tqdm(total=config.steps, initial=self.step, desc="training", disable=not self.progress)
        if resumed:
            bar.write(f"resumed from step {self.step} ({self.samples_seen} samples seen)")
        llm = self.llm
        tokens_per_step = config.batch_size * config.grad_accum * config.sample_tokens * self.accelerator.num_processes
        last = {}
        stop_at = min(config.steps, until or config.steps)
        deadline = time.monotonic() + 60 * max_minutes if max_minutes else float("inf")
        if config.val_every and self.step == 0:  # the starting point of the held-out curve
            self._log_validation(writer, bar)
        while self.step < stop_at:
            start = time.perf_counter()
            total, parts = 0.0, {}
            for _ in range(config.grad_accum):
                batch = self.next_batch()
                with self.accelerator.accumulate(self.embedder), self.accelerator.autocast():
                    book_loss, book_metrics = self.book_loss(batch)
                    losses = {"books": book_loss}
                    losses.update({o.name: o.loss(llm, self.embedder) for o in self.objectives})
                    loss = sum(losses.values())
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients and config.grad_clip:
                        self.accelerator.clip_grad_norm_(self.embedder.parameters(), config.grad_clip)
                    self.optimizer.step()
                    if self.accelerator.sync_gradients:  # the optimizer stepped: not a gradient-accumulation micro-step
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                total += loss.item() / config.grad_accum
                for name, part in losses.items():
                    parts[f"loss_{name}"] = parts.get(f"loss_{name}", 0.0) + part.item() / config.grad_accum
                measured = [("books", book_metrics)] + [(o.name, getattr(o, "metrics", {})) for o in self.objectives]
                for name, metrics in measured:  # what a loss measures beside itself (e.g. qa_own_minus_foreign)
                    for key, value in metrics.items():
                        parts[f"{name}_{key}"] = parts.get(f"{name}_{key}", 0.0) + value / config.grad_accum
            self.step += 1
            seconds = time.perf_counter() - start
            last = {"loss": total, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_step / seconds,
                    **(parts if self.objectives or book_metrics else {})}
            if writer is not None and self.step % config.log_every == 0:
                for name, value in last.items():
                    writer.add_scalar(f"train/{name}", value, self.step)
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            bar.update()
            if config.val_every and self.step % config.val_every == 0:  # inside --max-minutes' time
                self._log_validation(writer, bar)
            # every process stops at the same step (one may reach the deadline first): saving is a collective
            out_of_time = bool(self.accelerator.reduce(
                torch.tensor(float(time.monotonic() > deadline), device=self.accelerator.device), "max").item())
            if self.step % config.save_every == 0 or self.step == stop_at or out_of_time:
                self.save()
            if out_of_time:
                bar.write(f"stopping at step {self.step}: --max-minutes reached; rerun the same command to resume")
                break
        bar.close()
        if writer is not None:
            writer.close()
        assert not any(p.requires_grad for p in llm.parameters()), "the downstream LLM must stay frozen"
        return {"step": self.step, "finished": self.step >= stop_at, **last}
