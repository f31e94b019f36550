"""Paper-scale paths of the tokens chapter on random-init stand-ins and a generated ImageNet-style folder:
Zero-TPrune / EViT / ToMe on a ViT with timm's layout (shrink.tokens.vision), through the same score and
selection functions as the text encoder; the documented paper commands (timm + ImageNet, lmms-eval)."""

import pytest
import torch

from shrink import scales
from shrink.errors import ShrinkError
from shrink.tokens import select as sel
from shrink.tokens import vision as V
from shrink.tokens.attention import TokenInputError

WNIDS = ["n01440764", "n01443537", "n01484850"]


def imagenet_like_folder(root, per_class=2, size=(80, 64)):
    """``root/val/<wnid>/ILSVRC2012_val_000000NN.JPEG`` with random RGB images (ImageNet's layout)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    k = 0
    for wnid in WNIDS:
        d = root / "val" / wnid
        d.mkdir(parents=True)
        for _ in range(per_class):
            k += 1
            arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(d / f"ILSVRC2012_val_{k:08d}.JPEG")
    return root


@pytest.fixture(scope="module")
def vit():
    # vit_tiny-like stand-in, cut to 4 blocks and 64 px so the test is quick; same code path as 12 blocks at 224
    return V.load_vit("vit_tiny_patch16_224", standin=True, num_classes=len(WNIDS), depth=4, img_size=64, seed=0)


def _images(n=3, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_folder_and_preprocessing(tmp_path):
    imagenet_like_folder(tmp_path)
    items, classes = V.image_folder(tmp_path)
    assert classes == WNIDS and len(items) == 6
    assert [c for _, c in items[:3]] == [0, 1, 2]                     # round-robin: a prefix covers every class
    x = V.load_image(items[0][0], 64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    # an all-mean image normalises to zero
    from PIL import Image

    mean = tuple(round(255 * m) for m in V.IMAGENET_MEAN)
    Image.new("RGB", (70, 90), mean).save(tmp_path / "grey.png")
    assert V.load_image(tmp_path / "grey.png", 64).abs().max() < 0.01
    with pytest.raises(ShrinkError, match="ImageNet layout"):
        V.image_folder(tmp_path / "missing")


def test_unpruned_forward_equals_the_model(vit, one_thread):
    x = _images()
    out = V.forward(vit, x)
    assert (out.logits - vit(x)).abs().max() < 1e-5
    assert out.tokens_per_layer == [17] * 4
    assert torch.equal(V.forward(vit, x, method="tome", r=0).logits, out.logits)
    assert torch.equal(V.forward(vit, x, method="cls", keep=1.0).logits, out.logits)


@pytest.mark.parametrize("method", ["cls", "wpr", "zero_tprune", "random"])
def test_pruning_keeps_exact_counts(vit, method, one_thread):
    out = V.forward(vit, _images(), method=method, keep=0.5, prune_at=(0, 2), iterations=10,
                    generator=torch.Generator().manual_seed(0))
    n1 = sel.kept_count(0.5, 17)
    assert out.tokens_per_layer == [17, n1, n1, sel.kept_count(0.5, n1)]
    assert torch.isfinite(out.logits).all()
    assert V.vit_flops(vit, out.tokens_per_layer) < V.vit_flops(vit, [17] * 4)


def test_tome_merges_r_per_block_and_tracks_sizes(vit, one_thread):
    out = V.forward(vit, _images(), method="tome", r=3)
    assert out.tokens_per_layer == [17, 14, 11, 8]
    assert out.sizes.shape == (3, 5)                       # the last block merged 3 more after its attention
    assert torch.equal(out.sizes.sum(-1), torch.full((3,), 17.0))


def test_vit_flops_matches_flop_counter(vit, one_thread):
    from torch.utils.flop_counter import FlopCounterMode

    x = _images(1)
    for kw in ({}, {"method": "cls", "keep": 0.5, "prune_at": (1,)}):
        with FlopCounterMode(display=False) as fc:   # our block loop: explicit matmuls, attention counted
            out = V.forward(vit, x, **kw)
        assert abs(V.vit_flops(vit, out.tokens_per_layer) - fc.get_total_flops()) / fc.get_total_flops() < 0.01


def test_evaluate_folder_on_the_standin(tmp_path, vit, one_thread):
    imagenet_like_folder(tmp_path)
    base = V.evaluate_folder(vit, tmp_path, img_size=64, batch_size=4)
    pruned = V.evaluate_folder(vit, tmp_path, img_size=64, batch_size=4, method="zero_tprune", keep=0.5,
                               prune_at=(1,), iterations=10)
    merged = V.evaluate_folder(vit, tmp_path, img_size=64, batch_size=4, method="tome", r=4)
    assert base["images"] == 6 and base["classes"] == 3 and 0 <= base["top1"] <= 1
    assert pruned["gflops"] < base["gflops"] and merged["gflops"] < base["gflops"]


def test_bad_input(vit):
    with pytest.raises(TokenInputError, match="methods"):
        V.forward(vit, _images(), method="divprune")
    with pytest.raises(TokenInputError, match="prune_at"):
        V.forward(vit, _images(), method="cls", keep=0.5, prune_at=(3,))
    with pytest.raises(TokenInputError, match="generator"):
        V.forward(vit, _images(), method="random", keep=0.5, prune_at=(0,))
    with pytest.raises(ShrinkError, match="SHRINK_ONLINE|timm"):
        V.load_vit("deit_small_patch16_224", pretrained=True)


def test_timm_model_matches_our_block_loop(one_thread):
    pytest.importorskip("timm")   # not installable next to the pinned CPU torch here (see shrink.tokens.vision)
    m = V.load_vit("vit_tiny_patch16_224", standin=False, num_classes=3, depth=2, img_size=64)
    x = _images(2)
    assert (V.forward(m, x).logits - m(x)).abs().max() < 1e-4


def test_paper_commands_are_documented():
    enc = scales.get("tokens-encoder", "paper")
    assert "deit_small_patch16_224" in enc.paper_command and "evaluate_folder" in enc.paper_command
    dec = scales.get("tokens-decoder", "paper")
    assert "lmms_eval" in dec.paper_command and "llava" in dec.paper_command.lower()
