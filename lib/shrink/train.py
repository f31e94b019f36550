"""The one training loop of the package: fine-tuning or training causal LMs from scratch (full or LoRA).

Every chapter that trains uses :func:`train` — recovery of a pruned model (data chapter II), sparse training
(weights chapter II, through a :class:`~shrink.pruning.training.SparseUpdater`), loss reweighting, Q-Tuning,
the token crisis. There is no second loop elsewhere in the package.

What one step does (step ``t``, counted from 0):

1. ``batch = batches(t)`` — batches are a **function of the step** (see :func:`lm_batches`,
   :func:`sft_batches`), so a resumed run sees exactly the batches it would have seen;
2. ``batch = batch_hook(model, batch, t)`` if given (Q-Tuning drops samples and masks tokens here);
3. per-token losses ``ℓ_{i,j}`` (next-token cross entropy, ``labels == -100`` ignored), per-sample losses
   ``ℓ_i = Σ_j ℓ_{i,j} / n_i`` (mean over the sample's ``n_i`` counted tokens);
4. sample weights ``w = sample_weights(ℓ.detach(), t)`` (default uniform ``1/B``) and the loss
   ``L = Σ_i w_i ℓ_i``. The default computes the same ``w`` as a "uniform" strategy, so a uniform strategy
   reproduces the unweighted trajectory bit for bit;
5. backward, gradient clipping (``grad_clip``), ``optimizer.step()`` — or ``updater.step()`` when a sparse
   updater is given — and the LR schedule;
   After an LTH rewind (``info["rewound"]``) the LR schedule restarts at the updater's ``rewind_step``;
6. fixed ``masks`` are re-applied after the step (pruned weights stay exactly 0 under AdamW, whose moments
   would otherwise move them; :func:`check_masks` verifies it).

``loss_fn=(model, batch, t) -> loss`` (or ``(loss, n_tokens)``) replaces steps 3-4 for models that are not
causal LMs (a pruning module on a frozen encoder, 03h): the rest of the step — optimizer, schedule,
clipping, masks, checkpoints — is the same loop.

LoRA goes through ``peft`` (a kept library): ``TrainConfig(lora={"r": 8, "alpha": 16, "targets": [...]})``
wraps the model, trains the adapters only, and :func:`train` merges them at the end. A merged LoRA update
``W + BA`` is dense; with fixed masks the merged weight is re-masked (``(W + BA) ⊙ M``) and the fraction of
the update that this removes is reported as ``lora_masked_fraction`` — the pruned model stays sparse.

Checkpoints (``checkpoint_dir``): model (trainable part), optimizer, scheduler, updater, RNG state and
history every ``checkpoint_every`` steps, written atomically; a run started with the same directory and
config resumes from the last one and ends bit-identical to an uninterrupted run (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import BadInputError, CacheCorruptError, check_choice, check_fraction, check_int

SCHEDULES = ("constant", "cosine", "linear")


class TrainError(BadInputError):
    """A training setting or input that cannot work (the message names the fix)."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one run (all plain values: the config is part of cache keys).

    Attributes:
        steps: optimizer steps.
        lr: peak learning rate (AdamW).
        weight_decay, betas, eps: AdamW's.
        warmup: linear warm-up steps.
        schedule: ``"constant"``, ``"cosine"`` (to ``min_lr_ratio * lr``) or ``"linear"`` (to 0).
        min_lr_ratio: the cosine floor as a fraction of ``lr``.
        grad_clip: max global gradient norm (``None``: no clipping).
        seed: seeds initial RNG state (dropout, LoRA init); batch draws are seeded by the batch function.
        lora: ``None`` (full fine-tuning) or ``{"r": int, "alpha": float, "targets": [module names],
            "dropout": float}``.
        trainable: ``None`` (all parameters) or name substrings of the parameters to train (full mode).
        checkpoint_every: checkpoint period in steps (0: none).
        eval_every: period of ``eval_fn`` calls (0: only at the end).
        log_every: period of history entries (loss averaged over the period).
    """

    steps: int
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    lora: dict | None = None
    trainable: tuple[str, ...] | None = None
    checkpoint_every: int = 0
    eval_every: int = 0
    log_every: int = 10

    def __post_init__(self):
        check_int("steps", self.steps, minimum=1, fix="Pass the number of optimizer steps, e.g. steps=200.")
        check_int("warmup", self.warmup, minimum=0, fix="Pass warmup=0 or a few steps.")
        if self.warmup > self.steps:
            raise TrainError(f"warmup={self.warmup} exceeds steps={self.steps}; use warmup <= steps.")
        check_choice("schedule", self.schedule, SCHEDULES)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise TrainError(f"lr must be a positive finite number, got {self.lr!r}; e.g. lr=3e-4.")
        check_fraction("min_lr_ratio", self.min_lr_ratio, hi_open=False)
        if self.grad_clip is not None and not (self.grad_clip > 0):
            raise TrainError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}.")
        for name in ("checkpoint_every", "eval_every"):
            check_int(name, getattr(self, name), minimum=0, fix=f"Pass {name}=0 (off) or a period in steps.")
        check_int("log_every", self.log_every, minimum=1)
        if self.lora is not None:
            if not isinstance(self.lora, dict) or not self.lora.get("targets"):
                raise TrainError("lora must be a dict with at least 'targets' (module names such as "
                                 "['q_proj', 'v_proj']) and optionally 'r', 'alpha', 'dropout'.")
            check_int("lora['r']", self.lora.get("r", 8), minimum=1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["trainable"] = None if self.trainable is None else list(self.trainable)
        return d

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------
def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy per position.

    Args:
        logits: ``[B, T, V]`` float.
        labels: ``[B, T]`` int64; ``labels[:, j]`` is the token at position ``j`` (``-100`` = not counted).

    Returns:
        ``(loss, mask)``: ``[B, T-1]`` float losses of predicting ``labels[:, 1:]`` (0 where not counted) and
        the ``[B, T-1]`` bool mask of counted positions.
    """
    tgt = labels[:, 1:]
    mask = tgt != -100
    lg = logits[:, :-1].float()
    loss = nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.clamp_min(0).reshape(-1),
                                       reduction="none").view(tgt.shape)
    return loss * mask, mask


def sample_losses(tok_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean token loss ``ℓ_i = Σ_j ℓ_ij / max(n_i, 1)``, ``[B]`` (a sample with no counted token has 0)."""
    return tok_loss.sum(1) / mask.sum(1).clamp_min(1)


def uniform_weights(losses: torch.Tensor, step: int = 0) -> torch.Tensor:
    """``w_i = 1/B`` — the default of :func:`train` (so a 'uniform' reweighting strategy is the baseline)."""
    return torch.full_like(losses, 1.0 / losses.numel())


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: list[dict]) -> dict:
    """Mean token loss (nats) and perplexity over fixed batches (each ``{"input_ids", "labels"}``)."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"))
        tl, m = token_losses(out.logits, b["labels"])
        tot += float(tl.sum())
        n += int(m.sum())
    model.train(was)
    if n == 0:
        raise TrainError("evaluate_loss got batches with no counted token (all labels are -100).")
    return {"loss": tot / n, "ppl": math.exp(tot / n), "tokens": n}


# ----------------------------------------------------------------------------------------------------------
# Batches as functions of the step
# ----------------------------------------------------------------------------------------------------------
def _gen(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))


def lm_batches(tokens: torch.Tensor, batch_size: int, seqlen: int, *, seed: int = 0,
               unique_tokens: int | None = None) -> Callable[[int], dict]:
    """Random windows of a token stream: ``batches(t)`` -> ``{"input_ids", "labels"}`` ``[batch_size, seqlen]``.

    Window starts are drawn uniformly from ``[0, n - seqlen]`` by a generator seeded with ``(seed, t)``.
    ``unique_tokens`` restricts the draws to the first ``unique_tokens`` tokens (the token-crisis setting:
    a fixed number of tokens seen drawn from fewer unique ones).
    """
    check_int("batch_size", batch_size)
    check_int("seqlen", seqlen, minimum=2)
    tokens = tokens.reshape(-1).long()
    n = tokens.numel() if unique_tokens is None else min(int(unique_tokens), tokens.numel())
    if n < seqlen + 1:
        raise TrainError(f"the token stream has {n} tokens, fewer than seqlen+1={seqlen + 1}; use a shorter "
                         "seqlen or more text.")

    def batches(t: int) -> dict:
        starts = torch.randint(0, n - seqlen + 1, (batch_size,), generator=_gen(seed, t))
        ids = torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])
        return {"input_ids": ids, "labels": ids.clone()}

    return batches


def sft_batches(examples: list[dict], batch_size: int, *, seed: int = 0, epoch_order: bool = True,
                pad_id: int = 0) -> Callable[[int], dict]:
    """Batches of tokenized instruction examples (``{"input_ids": LongTensor, "labels": LongTensor}``).

    With ``epoch_order`` the examples are visited in a fresh permutation per epoch (seeded by (seed, epoch)),
    otherwise sampled with replacement per step. Batches are right-padded with ``pad_id`` (labels -100,
    ``attention_mask`` 0). ``batch["index"]`` holds the example indices (for per-sample hooks).
    """
    check_int("batch_size", batch_size)
    if not examples:
        raise TrainError("sft_batches got no examples; pass a non-empty list of tokenized examples (tokenize_sft).")
    n = len(examples)

    def batches(t: int) -> dict:
        if epoch_order:
            per_epoch = max(n // batch_size, 1)
            epoch, j = divmod(t, per_epoch)
            perm = torch.randperm(n, generator=_gen(seed, -1 - epoch))
            idx = perm[(j * batch_size) % n:][:batch_size]
            if idx.numel() < batch_size:  # n < batch_size: wrap around
                idx = torch.cat([idx, perm[:batch_size - idx.numel()]])
        else:
            idx = torch.randint(0, n, (batch_size,), generator=_gen(seed, t))
        return collate([examples[i] for i in idx.tolist()], pad_id=pad_id) | {"index": idx}

    return batches


def collate(examples: list[dict], pad_id: int = 0) -> dict:
    """Right-pad ``[{"input_ids", "labels"}]`` to one batch with ``attention_mask``."""
    T = max(int(e["input_ids"].numel()) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        k = int(e["input_ids"].numel())
        ids[i, :k] = e["input_ids"]
        labels[i, :k] = e["labels"]
        att[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": att}


PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def format_prompt(example: dict) -> str:
    """Alpaca prompt of an instruction example (``instruction``, optional ``input``)."""
    if example.get("input"):
        return PROMPT_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT.format(instruction=example["instruction"])


def tokenize_sft(tokenizer, example: dict, *, max_prompt: int = 256, max_response: int = 256) -> dict:
    """Prompt + response token ids; labels are -100 on the prompt (loss on the response only, Alpaca SFT).

    The prompt keeps its last ``max_prompt`` tokens, the response its first ``max_response`` plus EOS.
    """
    p = tokenizer.encode(format_prompt(example), add_special_tokens=False)[-max_prompt:]
    r = tokenizer.encode(str(example["output"]), add_special_tokens=False)[:max_response]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        r = r + [int(eos)]
    ids = torch.tensor(p + r, dtype=torch.long)
    labels = ids.clone()
    labels[:len(p)] = -100
    return {"input_ids": ids, "labels": labels}


# ----------------------------------------------------------------------------------------------------------
# LR schedule, masks, LoRA
# ----------------------------------------------------------------------------------------------------------
def lr_factor(cfg: TrainConfig, t: int) -> float:
    """Multiplier of ``cfg.lr`` at step ``t``: linear warm-up then constant / cosine / linear decay."""
    if cfg.warmup and t < cfg.warmup:
        return (t + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.steps - cfg.warmup, 1)
    p = min(max(t - cfg.warmup, 0) / span, 1.0)
    if cfg.schedule == "linear":
        return 1.0 - p
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def _mask_dict(masks) -> dict[str, torch.Tensor]:
    if masks is None:
        return {}
    d = masks.masks if hasattr(masks, "masks") else masks
    if not isinstance(d, dict):
        raise TrainError(f"masks must be a MaskSet or {{parameter name: bool tensor}}, got {type(masks).__name__}.")
    return d


@torch.no_grad()
def check_masks(model: nn.Module, masks) -> int:
    """Number of non-zero weights at pruned positions (0 when the model is as sparse as its masks)."""
    bad = 0
    for name, m in _mask_dict(masks).items():
        bad += int((model.get_parameter(name)[~m] != 0).sum())
    return bad


@torch.no_grad()
def _apply_masks(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    for name, m in masks.items():
        params[name].mul_(m)


def _add_lora(model: nn.Module, spec: dict):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=int(spec.get("r", 8)), lora_alpha=float(spec.get("alpha", 16)),
                     target_modules=list(spec["targets"]), lora_dropout=float(spec.get("dropout", 0.0)),
                     bias="none")
    return get_peft_model(model, cfg)


def _base_param_map(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """Parameters of the (possibly peft-wrapped) model under their base-model names."""
    out = {}
    for name in names:
        try:
            out[name] = model.get_parameter(name)
        except AttributeError:
            raise TrainError(f"mask {name!r} is not a parameter of the model; build the masks on this model "
                             "(names from model.named_parameters()).") from None
    return out


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns (``model`` is the trained module, LoRA merged)."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    resumed_from: int = 0
    info: dict = field(default_factory=dict)
    updater: Any = None

    def summary(self) -> dict:
        """JSON-able numbers for a record."""
        return {"history": self.history, "evals": self.evals, "seconds": round(self.seconds, 3),
                "tokens": self.tokens, "tokens_per_s": round(self.tokens / max(self.seconds, 1e-9), 2),
                "resumed_from": self.resumed_from, **self.info}


def _ckpt_file(directory: Path) -> Path:
    return directory / "checkpoint.pt"


def _save_ckpt(directory: Path, state: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".checkpoint.pt.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, _ckpt_file(directory))


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(model: nn.Module, batches: Callable[[int], dict], cfg: TrainConfig, *,
          masks=None, updater: Callable | None = None,
          sample_weights: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
          batch_hook: Callable[[nn.Module, dict, int], dict] | None = None,
          eval_fn: Callable[[nn.Module, int], dict] | None = None,
          checkpoint_dir: str | Path | None = None, progress: bool = True,
          on_step: Callable[[dict], None] | None = None,
          loss_fn: Callable[[nn.Module, dict, int], Any] | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` AdamW steps on ``batches(t)``; see the module docstring for one step.

    Args:
        model: a causal LM (``model(input_ids=, attention_mask=).logits`` ``[B, T, V]``), trained in place.
        batches: ``t -> {"input_ids": [B, T] int64, "labels": [B, T] int64 (-100 ignored), "attention_mask"?}``.
        cfg: :class:`TrainConfig`.
        masks: fixed masks (a ``MaskSet`` or ``{name: bool}``) kept applied: pruned weights stay 0.
        updater: ``(model, optimizer) -> SparseUpdater``-like object (``forward()`` context, ``step()``,
            ``state_dict``/``load_state_dict``); it owns the masks and replaces ``optimizer.step()``.
        sample_weights: ``(per-sample losses [B] (detached), t) -> weights [B]`` summing to 1 (reweighting).
        batch_hook: ``(model, batch, t) -> batch`` before the forward (Q-Tuning's sample/token pruning).
        eval_fn: ``(model, t) -> dict`` every ``cfg.eval_every`` steps and at the end.
        checkpoint_dir: resume from / write checkpoints here (keyed by ``cfg.key()``).
        on_step: called with each step's info dict (``step``, ``loss``, ``lr``, updater info).
        loss_fn: ``(model, batch, t) -> scalar loss`` or ``(loss, n_tokens)``: replaces the next-token loss
            (and the sample weighting) for models that are not causal LMs; ``batch`` is whatever
            ``batches(t)`` returns.

    Returns:
        :class:`TrainResult`.
    """
    if updater is not None and masks is not None:
        raise TrainError("pass either fixed masks or a sparse updater, not both (the updater owns its masks; "
                         "give it the initial masks: SparseUpdater(..., masks=masks)).")
    if loss_fn is not None and sample_weights is not None:
        raise TrainError("loss_fn replaces the per-sample next-token loss that sample_weights reweights; weigh "
                         "inside loss_fn instead, or drop one of them.")
    if updater is not None and cfg.lora is not None:
        raise TrainError("sparse updaters train the weights they mask; LoRA adapters would bypass them. Use full "
                         "fine-tuning (lora=None) with an updater, or fixed masks with LoRA.")
    mask_d = {k: v for k, v in _mask_dict(masks).items()}
    torch.manual_seed(cfg.seed)
    base = model
    if cfg.lora is not None:
        model = _add_lora(model, cfg.lora)
    elif cfg.trainable is not None:
        for n, p in model.named_parameters():
            p.requires_grad_(any(s in n for s in cfg.trainable))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainError("no trainable parameter: check cfg.trainable / cfg.lora['targets'] against the model's "
                         "parameter names.")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(cfg, t))
    upd = updater(base, opt) if updater is not None else None
    mask_params = _base_param_map(base, mask_d) if mask_d else {}
    if mask_d:
        _apply_masks(mask_params, mask_d)

    result = TrainResult(model=base)
    start = 0
    directory = Path(checkpoint_dir) / cfg.key() if checkpoint_dir is not None else None
    if directory is not None and _ckpt_file(directory).exists():
        try:
            st = torch.load(_ckpt_file(directory), weights_only=False)
        except Exception as e:  # noqa: BLE001 - a truncated/corrupt file
            raise CacheCorruptError(f"checkpoint {_ckpt_file(directory)} cannot be read ({e}); delete it to "
                                    "restart the run from step 0.") from e
        with torch.no_grad():
            named = dict(model.named_parameters())
            for n, v in st["trainable"].items():
                named[n].copy_(v)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if upd is not None:
            upd.load_state_dict(st["updater"])
        torch.set_rng_state(st["rng"])
        result.history, result.evals = st["history"], st["evals"]
        start = result.resumed_from = int(st["step"])
        result.tokens = int(st["tokens"])

    model.train()
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", mininterval=5.0, leave=False)
    acc, acc_n = 0.0, 0
    weigh = sample_weights or uniform_weights
    for t in range(start, cfg.steps):
        batch = batches(t)
        if batch_hook is not None:
            batch = batch_hook(model, batch, t)
        ctx = upd.forward() if upd is not None else _null()
        with ctx:
            if loss_fn is not None:
                got = loss_fn(model, batch, t)
                loss, n_tok = got if isinstance(got, tuple) else (got, 0)
                if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
                    raise TrainError("loss_fn must return a scalar tensor that requires grad (or (loss, n_tokens)); "
                                     f"got {type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}: compute it from "
                                     "the model's trainable parameters.")
            else:
                out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
                tl, m = token_losses(out.logits, batch["labels"])
                per = sample_losses(tl, m)
                w = weigh(per.detach(), t)
                loss = (w * per).sum()
                n_tok = int(m.sum())
        if not torch.isfinite(loss):
            raise TrainError(f"the loss became {float(loss.detach())} at step {t}; lower cfg.lr (now {cfg.lr}) or set "
                             "cfg.grad_clip. Nothing after this step was kept.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        info = upd.step() if upd is not None else (opt.step() or {})
        if info and info.get("rewound"):  # LTH: the schedule restarts at the rewind point with the weights
            sched.last_epoch = int(getattr(upd, "rewind_step", 0)) - 1
        sched.step()
        if mask_d:
            _apply_masks(mask_params, mask_d)
        result.tokens += int(n_tok)
        acc += float(loss.detach())
        acc_n += 1
        step_info = {"step": t, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"], **(info or {})}
        if on_step is not None:
            on_step(step_info)
        if (t + 1) % cfg.log_every == 0 or t + 1 == cfg.steps:
            result.history.append({"step": t + 1, "loss": acc / acc_n, "lr": step_info["lr"],
                                   "seconds": round(time.perf_counter() - t0, 3)})
            acc, acc_n = 0.0, 0
        if eval_fn is not None and cfg.eval_every and (t + 1) % cfg.eval_every == 0 and t + 1 < cfg.steps:
            result.evals.append({"step": t + 1, **eval_fn(model, t + 1)})
            model.train()
        if directory is not None and cfg.checkpoint_every and (t + 1) % cfg.checkpoint_every == 0:
            _save_ckpt(directory, {"step": t + 1, "trainable": _trainable_state(model),
                                   "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   "updater": upd.state_dict() if upd is not None else None,
                                   "rng": torch.get_rng_state(), "history": result.history,
                                   "evals": result.evals, "tokens": result.tokens, "config": cfg.to_dict()})
        if bar is not None:
            bar.update(1)
            if (t + 1) % cfg.log_every == 0:
                bar.set_postfix(loss=f"{result.history[-1]['loss']:.3f}")
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - t0
    model.eval()

    if cfg.lora is not None:
        merged = model.merge_and_unload()
        result.model = base = merged
        if mask_d:
            mask_params = _base_param_map(base, mask_d)
            with torch.no_grad():
                kept_out = sum(float(mask_params[n][~mm].pow(2).sum()) for n, mm in mask_d.items())
                total = sum(float(mask_params[n].pow(2).sum()) for n in mask_d)
            _apply_masks(mask_params, mask_d)
            result.info["lora_masked_fraction"] = kept_out / max(total, 1e-30)
    if upd is not None:
        upd.finalize()
        result.updater = upd
    if mask_d:
        bad = check_masks(base, mask_d)
        if bad:
            raise TrainError(f"{bad} pruned weights are non-zero after training: the masks were not kept "
                             "(a bug, please report it).")
        result.info["mask_violations"] = 0
    if eval_fn is not None:
        result.evals.append({"step": cfg.steps, **eval_fn(base, cfg.steps)})
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
