"""The model contract (docs/design.md) for every kind and a hybrid, through SeqModel: decode parity, chunked
prefill parity, causality, cache bytes versus L, gradients and bf16."""

import pytest
import torch

from seqbench.experiment import experiment_from_dict
from seqbench.models import build_model

SPECS = {
    "attention": {"kind": "attention", "d_model": 32, "n_layers": 2, "n_heads": 4},
    "attention-conv": {"kind": "attention", "d_model": 32, "n_layers": 2, "n_heads": 4, "short_conv": 4},
    "gqa": {"kind": "attention", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_expand": 2},
    "s4d": {"kind": "s4d", "d_model": 32, "n_layers": 2, "d_state": 16},
    "mamba": {"kind": "mamba", "d_model": 32, "n_layers": 2, "d_state": 8},
    "mamba2": {"kind": "mamba2", "d_model": 32, "n_layers": 2, "d_state": 16, "headdim": 16, "chunk_size": 8},
    "hybrid": {"kind": "hybrid", "d_model": 32, "n_layers": 4, "n_heads": 4, "d_state": 8, "headdim": 16,
               "chunk_size": 8, "layout": "MDSA", "mlp_expand": 2},
}


def make(name: str, dtype=torch.float32):
    spec = experiment_from_dict({"name": "t", "models": [{"name": name, **SPECS[name]}], "sweep": {"seq_lens": [8]}}).models[0]
    torch.manual_seed(0)
    return build_model(spec, dtype=dtype).eval()


def tokens(b: int, l: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (b, l), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_decode_parity(name, batch):
    model, toks, t = make(name), tokens(batch, 21), 9
    with torch.no_grad():
        full = model(toks)  # (b, l, vocab)
        cache = model.allocate_cache(batch, 21)
        last = model.prefill(toks[:, :t], cache)
        torch.testing.assert_close(last, full[:, t - 1], rtol=1e-4, atol=1e-4)
        for i in range(t, 21):
            torch.testing.assert_close(model.step(toks[:, i : i + 1], cache), full[:, i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_step_with_a_position_tensor_equals_the_int_step(name):
    """step_at(pos tensor) is the step a CUDA graph captures: static shapes, no host read. Run uncaptured here,
    it must give the logits and leave the cache of the int step at every position (attention masks the unwritten
    tail of its cache instead of slicing it)."""
    model, toks, t = make(name), tokens(2, 16), 5
    with torch.no_grad():
        by_int, by_tensor = model.allocate_cache(2, 16), model.allocate_cache(2, 16)
        model.prefill(toks[:, :t], by_int)
        model.prefill(toks[:, :t], by_tensor)
        pos = torch.tensor([t])
        for i in range(t, 16):
            expected = model.step(toks[:, i : i + 1], by_int)
            torch.testing.assert_close(model.step_at(toks[:, i : i + 1], by_tensor, pos), expected, rtol=1e-4, atol=1e-4)
            pos.add_(1)
        for a, b in zip(by_int.tensors(), by_tensor.tensors(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_chunked_prefill_equals_one_forward(name):
    model, toks = make(name), tokens(2, 37)
    with torch.no_grad():
        full = model(toks)[:, -1]
        torch.testing.assert_close(model.prefill(toks), full, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.prefill(toks, chunk_len=10), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_causality(name):
    model, toks, t = make(name), tokens(2, 24), 11
    changed = toks.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 256
    with torch.no_grad():
        a, b = model(toks), model(changed)
    # FFT convolution (S4D) mixes rounding error across all positions, hence not atol=0; a real leak is O(1).
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_cache_bytes_grow_only_for_attention(name):
    model = make(name)
    n_short, n_long = model.allocate_cache(2, 64).nbytes(), model.allocate_cache(2, 128).nbytes()
    attn_layers = sum(type(b.mixer).__name__ == "Attention" for b in model.blocks)
    if attn_layers == 0:
        assert n_short == n_long > 0
    else:
        per_position = attn_layers * 2 * 2 * model.blocks[0].mixer.d_model * 4  # layers · (k, v) · b · kv width · fp32
        if name == "gqa":
            per_position //= 2
        assert n_long - n_short == 64 * per_position


@pytest.mark.parametrize("name", sorted(SPECS))
def test_gradients_reach_every_parameter(name):
    model = make(name).train()
    toks = tokens(2, 16)
    logits = model(toks[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), toks[:, 1:].flatten()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", sorted(SPECS))
def test_bfloat16_runs_and_tracks_float32(name):
    toks = tokens(1, 16)
    with torch.no_grad():
        ref = make(name)(toks).float()
        low_model = make(name).to(torch.bfloat16)  # the same weights, rounded: a fair comparison with float32
        low = low_model(toks).float()
        cache_model = make(name, torch.bfloat16)  # built directly in bf16 (what a bf16 run does)
        cache = cache_model.allocate_cache(1, 17)
        cache_model.prefill(toks, cache)
        step = cache_model.step(toks[:, :1], cache)
    assert torch.isfinite(low).all() and torch.isfinite(step.float()).all()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_short_conv_state_is_counted_in_the_cache():
    plain, conv = make("attention"), make("attention-conv")
    extra = conv.allocate_cache(3, 16).nbytes() - plain.allocate_cache(3, 16).nbytes()
    assert extra == 2 * 3 * 32 * 4 * 4  # layers · batch · d_model · conv width · float32 bytes
