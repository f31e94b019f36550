"""Paper scale of the tokens chapter: Zero-TPrune, EViT and ToMe on a ViT (``timm`` layout) over an
ImageNet-style image folder, through the same score and selection functions as the text encoder.

The papers' setting is DeiT-S / ViT-B from ``timm`` (pretrained) on ImageNet-1k validation
(``val/<wnid>/*.JPEG``); the quantity is top-1 accuracy against GFLOPs (Zero-TPrune Fig. 5 / Table 2,
ToMe's off-the-shelf table). That needs the weights (Hub download) and the data set, so here the path is
exercised on a **random-init stand-in** with the same module layout and a generated folder.

``timm`` itself is optional: its wheels need ``torchvision``, whose PyPI builds are CUDA builds whose C
extension does not load next to the CPU build of torch this project pins (and pip would otherwise replace
torch). :func:`load_vit` therefore builds ``timm.create_model(name)`` when timm imports, and otherwise
:class:`StandinViT`, a minimal ViT with timm's attribute names (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks[i].norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``, ``norm``,
``head``). :func:`forward` reads only those names, so it runs either model.

Block loop (:func:`forward`): tokens ``x [B, 1 + N, D]`` ([CLS] first, always protected). In every block
the attention is computed from ``attn.qkv`` (the probabilities are needed for the scores; with ToMe the
``log size`` bias of proportional attention is added). After block ``l`` in ``prune_at`` the tokens are
scored with that block's attention and ``round(keep · n)`` are kept (``cls``: EViT; ``wpr``: Zero-TPrune's
I-stage; ``zero_tprune``: I + S stage on the keys; ``random``), or ToMe merges ``r`` tokens in every block
(bipartite soft matching on the head-averaged keys). ``keep = 1`` and ``r = 0`` reproduce the model's own
logits.

Introduced in: tests/lib/test_tokens_paper.py (paper-scale path; no notebook runs it on CPU)
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as Fn
from torch import nn

from ..errors import ShrinkError
from . import flops as FL
from . import scores as S
from . import select as sel
from .attention import TokenInputError

METHODS = ("none", "cls", "wpr", "zero_tprune", "random", "tome")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
def image_folder(root: str | Path, split: str = "val", limit: int | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """ImageNet-style folder ``root/split/<class>/*.JPEG`` -> ``([(path, class index)], class names)``;
    classes are the sorted sub-folder names (torchvision's ``ImageFolder`` order); ``limit`` images at most,
    taken round-robin over classes so a prefix covers every class."""
    base = Path(root) / split
    if not base.is_dir():
        raise ShrinkError(f"no image folder {base}; expected the ImageNet layout {base}/<class>/*.JPEG "
                          "(set SHRINK_IMAGENET to the folder that holds val/)")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    per = [sorted(q for q in (base / c).iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS) for c in classes]
    if not classes or not any(per):
        raise ShrinkError(f"{base} holds no class folders with .JPEG/.jpg/.png images")
    items = []
    for i in range(max(len(p) for p in per)):
        items += [(p[i], c) for c, p in enumerate(per) if i < len(p)]
    return (items[:limit] if limit else items), classes


def load_image(path: str | Path, size: int = 224, crop_pct: float = 0.875) -> torch.Tensor:
    """DeiT/timm evaluation preprocessing without torchvision: resize the shorter side to
    ``size / crop_pct`` (bicubic), centre-crop ``size``, scale to [0, 1], normalise with the ImageNet
    mean/std -> fp32 ``[3, size, size]``."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    short = int(math.floor(size / crop_pct))
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(Fn.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _Attn(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, img, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.num_patches = (img // patch) ** 2

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class StandinViT(nn.Module):
    """A random-init ViT with timm's ``VisionTransformer`` attribute names (pre-norm blocks, [CLS] token,
    learned absolute positions, LayerNorm eps 1e-6, GELU MLP); ``forward(images [B, 3, H, W]) -> logits``.
    Defaults: ``vit_tiny_patch16_224`` (12 blocks, d=192, 3 heads)."""

    def __init__(self, *, img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0,
                 num_classes=1000, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.patch_embed = _PatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self.num_prefix_tokens = 1
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            self.cls_token.copy_(torch.randn(self.cls_token.shape, generator=g) * 0.02)
            self.pos_embed.copy_(torch.randn(self.pos_embed.shape, generator=g) * 0.02)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


STANDINS = {  # timm name -> StandinViT config (same shapes as timm's)
    "vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
}


def load_vit(name: str, *, pretrained: bool = False, num_classes: int = 1000, standin: bool | None = None,
             seed: int = 0, **overrides) -> nn.Module:
    """A ViT by timm name. ``pretrained=True`` needs timm (and the Hub: set ``SHRINK_ONLINE=1``);
    otherwise a random-init model: timm's own if ``standin`` is False (or None and timm imports),
    :class:`StandinViT` with the same shapes if ``standin`` is True (or timm is missing).
    ``overrides`` (e.g. ``depth=2``) shrink the stand-in for tests."""
    if pretrained:
        import os

        if not timm_available():
            raise ShrinkError("pretrained ViTs need timm: pip install timm (with a torchvision that matches torch)")
        if os.environ.get("SHRINK_ONLINE") != "1":
            raise ShrinkError(f"timm would download {name}'s weights; set SHRINK_ONLINE=1 on a machine with internet")
        import timm

        return timm.create_model(name, pretrained=True, num_classes=num_classes).eval()
    use_standin = (not timm_available()) if standin is None else standin
    if not use_standin:
        import timm

        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **overrides).eval()
    if name not in STANDINS:
        raise ShrinkError(f"no stand-in for {name!r}; stand-ins: {', '.join(STANDINS)}")
    return StandinViT(**{**STANDINS[name], **overrides}, num_classes=num_classes, seed=seed).eval()


# --------------------------------------------------------------------------------------------------
# Pruned forward
# --------------------------------------------------------------------------------------------------
@dataclass
class VitOut:
    """``logits [B, C]``; ``tokens_per_layer`` (tokens each block ran on, [CLS] included); ``sizes [B, n]``."""

    logits: torch.Tensor
    tokens_per_layer: list[int]
    sizes: torch.Tensor


def _attention(blk, x, bias):
    """``(attention output after proj, probabilities [B, H, n, n], keys [B, H, n, hd])`` of one block."""
    b, n, d = x.shape
    a = blk.attn
    heads = a.num_heads
    q, k, v = a.qkv(x).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    if hasattr(a, "q_norm"):
        q, k = a.q_norm(q), a.k_norm(k)
    logits = (q * (d // heads) ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    p = logits.softmax(-1)
    out = (p @ v).transpose(1, 2).reshape(b, n, d)
    if hasattr(a, "norm") and not isinstance(a.norm, nn.Identity):
        out = a.norm(out)
    return a.proj(out), p, k


def _ls(blk, name):
    return getattr(blk, name, None) or nn.Identity()


@torch.no_grad()
def forward(model: nn.Module, images: torch.Tensor, *, method: str = "none", keep: float = 1.0,
            prune_at: tuple[int, ...] = (3, 6, 9), r: int = 0, generator: torch.Generator | None = None,
            iterations: int = 30, s_share: float = 0.5, proportional: bool = True) -> VitOut:
    """ViT forward of ``images [B, 3, H, W]`` with tokens pruned after the blocks in ``prune_at`` (each a
    block index; scores from that block's attention) to ``round(keep · n)``, or merged by ToMe (``r``
    tokens in every block, after its attention, with proportional attention). [CLS] is never dropped."""
    if method not in METHODS:
        raise TokenInputError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    blocks = model.blocks
    if method not in ("none", "tome"):
        sel.kept_count(keep, 2)
        if keep < 1.0 and any(not 0 <= p < len(blocks) - 1 for p in prune_at):
            raise TokenInputError(f"prune_at={prune_at}: block indices must lie in [0, {len(blocks) - 2}]")
        if method == "random" and generator is None:
            raise TokenInputError("method 'random' needs generator=torch.Generator().manual_seed(seed)")
    if method == "tome" and r < 0:
        raise TokenInputError(f"ToMe's r (tokens merged per block) must be >= 0, got {r}")
    x = model.patch_embed(images)
    if x.dim() == 4:  # timm with output_fmt NHWC
        x = x.flatten(1, 2)
    npt = getattr(model, "num_prefix_tokens", 1)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = x + model.pos_embed
    if hasattr(model, "norm_pre"):
        x = model.norm_pre(x)
    b, n, _ = x.shape
    sizes = torch.ones(b, n)
    per_layer = []
    for i, blk in enumerate(blocks):
        per_layer.append(x.shape[1])
        bias = torch.log(sizes) if (method == "tome" and proportional) else None
        att, p, k = _attention(blk, blk.norm1(x), bias)
        x = x + _ls(blk, "ls1")(att)
        prot = torch.zeros(b, x.shape[1], dtype=torch.bool)
        prot[:, :npt] = True
        if method == "tome" and r > 0:
            rr = min(r, int((~prot[:, 0::2]).sum(-1).min()))
            metric = k.mean(1)
            m = sel.tome_merge(x, metric, rr, sizes=sizes, protected=prot)
            x, sizes = m.x, m.sizes
        x = x + _ls(blk, "ls2")(blk.mlp(blk.norm2(x)))
        if method not in ("none", "tome") and i in prune_at and keep < 1.0:
            if method == "zero_tprune":
                imp = S.score("wpr", p, iterations=iterations)
                feats = k.transpose(1, 2).reshape(b, x.shape[1], -1)
                idx = sel.zero_tprune_keep(imp, feats, keep, protected=prot, s_share=s_share)
            else:
                sc = S.score(method, p, n=x.shape[1], batch=b, generator=generator, iterations=iterations)
                idx = sel.topk_keep(sc, keep, protected=prot)
            x = sel.gather(x, idx)
            sizes = torch.gather(sizes, 1, idx)
    x = model.norm(x)
    # timm: forward_head pools ([CLS] for global_pool="token"), applies fc_norm / head_drop, then the head
    logits = model.forward_head(x) if hasattr(model, "forward_head") else model.head(x[:, 0])
    return VitOut(logits, per_layer, sizes)


def vit_flops(model: nn.Module, tokens_per_layer: list[int]) -> int:
    """FLOPs (2 x MACs) of the patch embedding, the blocks on ``tokens_per_layer`` tokens (the BERT block
    formula of :func:`shrink.tokens.flops.block_flops`: projections, attention, MLP) and the head."""
    d = model.cls_token.shape[-1]
    blk = model.blocks[0]
    cfg = SimpleNamespace(hidden_size=d, num_attention_heads=blk.attn.num_heads,
                          intermediate_size=blk.mlp.fc1.out_features, vocab_size=1)
    conv = model.patch_embed.proj
    n_patches = tokens_per_layer[0] - getattr(model, "num_prefix_tokens", 1)
    total = 2 * n_patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * d
    total += sum(sum(FL.block_flops(cfg, int(t), encoder=True).values()) for t in tokens_per_layer)
    return int(total + 2 * d * model.head.out_features)


@torch.no_grad()
def evaluate_folder(model: nn.Module, root: str | Path, *, split: str = "val", limit: int | None = None,
                    batch_size: int = 16, img_size: int = 224, **kw) -> dict:
    """Top-1 accuracy, GFLOPs per image and images/s of :func:`forward` (``kw``: method, keep, prune_at,
    r, ...) over an ImageNet-style folder. Throughput is wall-clock of the forwards only (recorded, never
    asserted)."""
    items, classes = image_folder(root, split, limit)
    correct, flops, seconds = 0, [], 0.0
    for s in range(0, len(items), batch_size):
        chunk = items[s: s + batch_size]
        x = torch.stack([load_image(p, img_size) for p, _ in chunk])
        y = torch.tensor([c for _, c in chunk])
        t0 = time.perf_counter()
        out = forward(model, x, **kw)
        seconds += time.perf_counter() - t0
        correct += int((out.logits.argmax(-1) == y).sum())
        flops += [vit_flops(model, out.tokens_per_layer)] * len(chunk)
    return {"images": len(items), "classes": len(classes), "top1": correct / len(items),
            "gflops": sum(flops) / len(flops) / 1e9, "images_per_s": len(items) / seconds if seconds else None}
