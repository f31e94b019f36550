"""benchmarks/bench_forward.py: the floor's products are the forward's products, and the attention cores and
cross-entropy forms it times compute the same thing (timings themselves are never asserted)."""

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from shrink import models
from shrink.tokens.flops import counted_flops, model_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_forward as bf  # noqa: E402


def test_floor_products_are_the_forwards_products():
    model, _ = models.load("tiny-llama")
    model.eval()
    n = 64
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0))
    shapes = bf.gemm_shapes(model.config, n)
    lin = sum(bf.shape_flops(k, d) * c for k, d, c in shapes.values() if k == "linear")
    bmm = sum(bf.shape_flops(k, d) * c for k, d, c in shapes.values() if k == "bmm")
    counted, _ = counted_flops(lambda: model(input_ids=ids))
    assert counted in (lin, lin + bmm)  # FlopCounterMode counts every linear; torch 2.13 leaves CPU SDPA uncounted
    assert lin + bmm == model_flops(model.config, [n] * model.config.num_hidden_layers)["total"]
    # the two batched products are exactly the eager attention's matmuls, counted independently
    cfg = model.config
    _, eager = bf.attention_core(cfg.num_attention_heads, cfg.num_key_value_heads, n,
                                 cfg.hidden_size // cfg.num_attention_heads, torch.Generator().manual_seed(1))
    per_layer, _ = counted_flops(eager)
    assert per_layer * cfg.num_hidden_layers == bmm


def test_attention_cores_agree():
    sdpa, eager = bf.attention_core(9, 3, 128, 64, torch.Generator().manual_seed(0))
    a, b = sdpa(), eager()
    assert a.shape == b.shape == (1, 9, 128, 64)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_cross_entropy_forms_agree_with_naive():
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(1, 600, 1000, generator=g) * 3, torch.randint(0, 1000, (1, 600), generator=g)
    vals = {k: f() for k, f in bf.ce_variants(logits, ids).items()}
    logp = F.log_softmax(logits[0, :-1].double(), -1)
    naive = -logp.gather(1, ids[0, 1:, None]).sum().item()
    for k, v in vals.items():
        assert math.isclose(v, naive, rel_tol=1e-5), k
