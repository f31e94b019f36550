import pytest
import torch

from shrink import models
from shrink.errors import OfflineError, UnknownNameError, UnsupportedModelError

TINY = ["tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-opt"]


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("shape", [(1, 17), (3, 40)])
def test_block_runner_reproduces_full_forward(name, shape):
    model, _ = models.load(name)
    ids = torch.randint(0, 259, shape, generator=torch.Generator().manual_seed(1))
    runner = models.BlockRunner(model)
    with torch.no_grad():
        ref = model(ids).logits
    assert torch.allclose(runner.logits(ids), ref, atol=1e-5, rtol=0)
    # block by block, with kwargs captured for a different shape first
    runner.block_kwargs(2, 5)
    h = runner.embed(ids)
    for i in range(len(runner)):
        h = runner.run_block(i, h)
    assert torch.allclose(runner.head(h), ref, atol=1e-5, rtol=0)


def test_block_runner_substitute_block_changes_output():
    model, _ = models.load("tiny-llama")
    runner = models.BlockRunner(model)
    ids = torch.randint(0, 259, (1, 12))
    h = runner.embed(ids)
    import copy

    clone = copy.deepcopy(runner.blocks[0])
    with torch.no_grad():
        assert torch.equal(runner.run_block(0, h, block=clone), runner.run_block(0, h))
        for p in clone.parameters():
            p.zero_()
        # a zeroed block is the identity on the residual stream
        assert torch.allclose(runner.run_block(0, h, block=clone), h)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-mistral"])
def test_kv_prefix_equals_prepending_tokens(name):
    model, _ = models.load(name)
    prefix_ids = [5, 17, 99]
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    prefix = models.KVPrefix.from_tokens(model, prefix_ids)
    assert prefix.length == 3
    with torch.no_grad():
        full = model(torch.cat([torch.tensor([prefix_ids] * 2), ids], 1)).logits[:, 3:]
        with_cache = model(ids, past_key_values=prefix.cache(2), use_cache=True).logits
        again = model(ids, past_key_values=prefix.cache(2), use_cache=True).logits  # fresh cache each call
    assert torch.allclose(with_cache, full, atol=1e-5)
    assert torch.equal(with_cache, again)


def test_kv_prefix_save_load_roundtrip(tmp_path):
    model, _ = models.load("tiny-llama")
    p = models.KVPrefix.from_tokens(model, [1, 2])
    p.save(tmp_path / "p.pt")
    q = models.KVPrefix.load(tmp_path / "p.pt")
    assert q.token_ids == [1, 2] and all(torch.equal(a, b) for a, b in zip(p.keys, q.keys))


def test_tiny_models_are_seeded():
    a, _ = models.load("tiny-llama", seed=3)
    b, _ = models.load("tiny-llama", seed=3)
    c, _ = models.load("tiny-llama", seed=4)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_unknown_model_names_the_registry():
    with pytest.raises(UnknownNameError, match="smollm2-135m"):
        models.load("no-such-model")


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(OfflineError, match="SHRINK_ONLINE=1"):
        models.load("facebook/opt-125m")


def test_standins_are_announced_and_recorded(monkeypatch, capsys):
    monkeypatch.setenv("SHRINK_STANDINS", "1")
    model, tok = models.load("meta-llama/Llama-2-7b-hf")
    assert model.config.model_type == "llama"
    assert model.shrink_info["standin"] and model.shrink_info["standin_for"] == "meta-llama/Llama-2-7b-hf"
    assert "stand-in" in capsys.readouterr().out
    opt, _ = models.load("facebook/opt-125m")
    assert opt.config.model_type == "opt"


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="supported"):
        models.BlockRunner(m)


def test_byte_tokenizer_roundtrip():
    tok = models.ByteTokenizer()
    text = "Shrink — ünïcode ok"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a", add_special_tokens=True) == [256, 97]


def test_corrupt_model_cache_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    folder = models.smollm2_cache_path()
    folder.mkdir(parents=True)
    (folder / "DONE").write_text("x")
    (folder / "config.json").write_text("{broken")
    from shrink.errors import CacheCorruptError

    with pytest.raises(CacheCorruptError, match=str(folder)):
        models.load("smollm2-135m")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_prefixed_lm_equals_prepended_tokens(name):
    model, _ = models.load(name)
    prefix = models.KVPrefix.from_tokens(model, [7, 8, 9, 10])
    wrapped = models.PrefixedLM(model, prefix)
    ids = torch.randint(0, 256, (3, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(torch.cat([torch.tensor([[7, 8, 9, 10]] * 3), ids], 1)).logits[:, 4:]
        out = wrapped(ids).logits
        masked = wrapped(ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(masked, ref, atol=1e-5)
    assert wrapped.config is model.config and wrapped.device == torch.device("cpu")
