"""The chunked SSD reference (seqbench.ops.ssd) against a test-only sequential recurrence in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import seqbench.ops.ssd as ssd_mod
import seqbench.ops.ssd_states as ssd_states
from seqbench.ops import get
from seqbench.ops.ssd import ssd


def loop_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_states=None):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T, y_t = h_t C_t + D x_t, y *= silu(z): one step at a time."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = F.softplus(dt)
    Bh, Ch = B.repeat_interleave(h // g, dim=2), C.repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    state = torch.zeros(b, h, p, n, dtype=torch.float64) if initial_states is None else initial_states.double()
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (b, h, 1, 1)
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        y = (state * Ch[:, t, :, None, :]).sum(-1)  # (b, h, p)
        if D is not None:
            y = y + x[:, t] * (D.double() if D.dim() == 2 else D.double()[:, None])
        if z is not None:
            y = y * F.silu(z[:, t].double())
        ys.append(y)
    return torch.stack(ys, dim=1), state


def inputs(b, l, h, p, g, n, seed=0, dt_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return {
        "x": r(b, l, h, p),
        "dt": r(b, l, h) * dt_scale,
        "A": -torch.rand(h, generator=gen) * 8 - 0.5,
        "B": r(b, l, g, n),
        "C": r(b, l, g, n),
        "D_h": r(h),
        "D_hp": r(h, p),
        "z": r(b, l, h, p),
        "dt_bias": r(h),
        "init": r(b, h, p, n),
    }


CASES = [  # (l, chunk_size, g, D kind, z, initial state)
    (37, 8, 1, "h", True, False),
    (37, 8, 2, "hp", False, True),
    (5, 16, 2, None, True, True),
    (48, 16, 1, "hp", True, True),
    (23, 1, 2, "h", False, False),
]


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("l,q,g,d_kind,use_z,use_init", CASES)
def test_ssd_matches_sequential_loop(b, l, q, g, d_kind, use_z, use_init):
    h, p, n = 4, 3, 5
    t = inputs(b, l, h, p, g, n)
    D = {"h": t["D_h"], "hp": t["D_hp"], None: None}[d_kind]
    z = t["z"] if use_z else None
    init = t["init"] if use_init else None
    y, final = ssd(
        t["x"],
        t["dt"],
        t["A"],
        t["B"],
        t["C"],
        q,
        D=D,
        z=z,
        dt_bias=t["dt_bias"],
        dt_softplus=True,
        initial_states=init,
        return_final_states=True,
    )
    y_ref, final_ref = loop_ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], D, z, t["dt_bias"], True, init)
    assert y.shape == (b, l, h, p) and final.shape == (b, h, p, n)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("b", [1, 3])
def test_extreme_dt(b):
    """Δ from 1e-7 to 1e3 (decays down to exp(-8e3) per step), raw Δ without softplus, and a chunk whose early
    steps decay enormously while later ones barely decay: the segment sums must not lose precision."""
    h, p, n, g, l, q = 4, 3, 5, 2, 64, 32
    t = inputs(b, l, h, p, g, n, seed=3)
    dt = torch.exp(
        torch.empty(b, l, h).uniform_(math.log(1e-7), math.log(1e3), generator=torch.Generator().manual_seed(4))
    )
    dt[:, 32:40] = 500.0  # a huge cumulative decay early in the second chunk ...
    dt[:, 40:64] = 1e-3  # ... followed by steps whose segment sums are tiny differences of huge cumsums
    y, final = ssd(
        t["x"], dt, t["A"], t["B"], t["C"], q, D=t["D_h"], initial_states=t["init"], return_final_states=True
    )
    y_ref, final_ref = loop_ssd(t["x"], dt, t["A"], t["B"], t["C"], t["D_h"], initial_states=t["init"])
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-4, atol=1e-4)


def test_groups_of_chunks_carry_the_state(monkeypatch):
    """Splitting a long input into groups of chunks (the O(group) memory path) changes nothing."""
    t = inputs(2, 203, 4, 3, 2, 5, seed=5)
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], 8)
    kw = {
        "D": t["D_hp"],
        "z": t["z"],
        "dt_bias": t["dt_bias"],
        "dt_softplus": True,
        "initial_states": t["init"],
        "return_final_states": True,
    }
    y1, f1 = ssd(*args, **kw)
    monkeypatch.setattr(ssd_mod, "GROUP_ELEMS", 1)  # one chunk per group: 26 groups
    y2, f2 = ssd(*args, **kw)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f1, f2, rtol=1e-5, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_never_builds_a_per_position_state_tensor(monkeypatch):
    b, l, h, p, g, n = 1, 2048, 2, 4, 1, 16
    t = inputs(b, l, h, p, g, n)
    monkeypatch.setattr(ssd_mod, "GROUP_ELEMS", 4096)
    with _LargestTensor() as mode:
        ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=t["D_h"], return_final_states=True)
    assert mode.largest <= b * l * h * p  # the output itself; a (b, l, h, p, n) tensor would be 16x that


def test_gradients_match_the_loop():
    b, l, h, p, g, n, q = 2, 19, 4, 3, 2, 5, 8
    t = inputs(b, l, h, p, g, n, seed=7)
    names = ["x", "dt", "A", "B", "C", "D_hp", "z", "dt_bias", "init"]
    ours = {k: t[k].clone().requires_grad_() for k in names}
    ref = {k: t[k].double().clone().requires_grad_() for k in names}
    y, final = ssd(
        ours["x"],
        ours["dt"],
        ours["A"],
        ours["B"],
        ours["C"],
        q,
        D=ours["D_hp"],
        z=ours["z"],
        dt_bias=ours["dt_bias"],
        dt_softplus=True,
        initial_states=ours["init"],
        return_final_states=True,
    )
    y_ref, final_ref = loop_ssd(
        ref["x"], ref["dt"], ref["A"], ref["B"], ref["C"], ref["D_hp"], ref["z"], ref["dt_bias"], True, ref["init"]
    )
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(8))
    wf = torch.randn(final.shape, generator=torch.Generator().manual_seed(9))
    ((y * w).sum() + (final * wf).sum()).backward()
    ((y_ref * w.double()).sum() + (final_ref * wf.double()).sum()).backward()
    for k in names:
        assert torch.isfinite(ours[k].grad).all(), k
        torch.testing.assert_close(ours[k].grad.double(), ref[k].grad, rtol=1e-3, atol=1e-3, msg=k)


def test_bfloat16_inputs_compute_in_float32():
    t = inputs(1, 40, 4, 8, 1, 16, seed=11)
    lo = {k: v.bfloat16() for k, v in t.items()}
    y_lo, f_lo = ssd(
        lo["x"],
        lo["dt"],
        t["A"],
        lo["B"],
        lo["C"],
        16,
        D=t["D_h"],
        z=lo["z"],
        dt_bias=t["dt_bias"],
        dt_softplus=True,
        return_final_states=True,
    )
    y_ref, f_ref = loop_ssd(
        lo["x"].float(),
        lo["dt"].float(),
        t["A"],
        lo["B"].float(),
        lo["C"].float(),
        t["D_h"],
        lo["z"].float(),
        t["dt_bias"],
        True,
    )
    assert y_lo.dtype == torch.bfloat16 and f_lo.dtype == torch.float32
    # Only the final rounding of y to bfloat16 separates the two (internals run in float32).
    torch.testing.assert_close(y_lo.double(), y_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(f_lo.double(), f_ref, rtol=1e-4, atol=1e-4)


def test_dt_limit_clamps_after_softplus():
    t = inputs(1, 20, 4, 3, 1, 5, seed=12)
    y = ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, dt_bias=t["dt_bias"], dt_softplus=True, dt_limit=(0.2, 0.5))
    dt = F.softplus(t["dt"] + t["dt_bias"]).clamp(0.2, 0.5)
    y_ref, _ = loop_ssd(t["x"], dt, t["A"], t["B"], t["C"])
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


def test_shape_errors_are_clear():
    t = inputs(1, 8, 4, 3, 1, 5)
    with pytest.raises(ValueError, match="groups"):
        ssd(t["x"], t["dt"], t["A"], torch.randn(1, 8, 3, 5), torch.randn(1, 8, 3, 5), 4)
    with pytest.raises(ValueError, match="A must be"):
        ssd(t["x"], t["dt"], t["A"][:2], t["B"], t["C"], 4)


def test_registry_serves_the_reference():
    fn, label = get("ssd", "ref")
    assert fn is ssd and label == "torch-ssd-chunked"


# --- blocking: the reference picks its own blocks; neither they nor the config's chunk_size change the result ---

FULL = {"D": "D_hp", "z": "z", "dt_bias": "dt_bias", "initial_states": "init"}


def _run(t, chunk_size=8, **over):
    kw = {k: t[v] for k, v in FULL.items()}
    kw.update(over)
    return ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size, dt_softplus=True, return_final_states=True, **kw)


def _loop(t):
    return loop_ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D_hp"], t["z"], t["dt_bias"], True, t["init"])


def test_the_chunk_size_argument_does_not_change_the_output():
    t = inputs(2, 45, 4, 3, 2, 5, seed=20)
    y1, f1 = _run(t, chunk_size=1)
    for q in (8, 64, 256):
        y, f = _run(t, chunk_size=q)
        assert torch.equal(y, y1) and torch.equal(f, f1), q


@pytest.mark.parametrize("q", [1, 3, 8, 16, 37])
def test_any_block_length_matches_the_loop(monkeypatch, q):
    """l = 37 is a multiple of no block but itself: every case ends on a shorter block."""
    monkeypatch.setattr(ssd_mod, "block_len", lambda *a, **k: q)
    t = inputs(2, 37, 4, 3, 2, 5, seed=21)
    y, final = _run(t)
    y_ref, final_ref = _loop(t)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("l", [1, 2, 7, 63, 64, 65, 129, 200])
def test_blocks_cover_exactly_l_positions(monkeypatch, l):
    """Nothing is padded: the groups' lengths sum to l, and each is whole blocks of at most l positions."""
    seen = []
    real = ssd_mod._block_group

    def spy(x, dt, A, B, C, state, q, need_state, out=None):
        seen.append((x.shape[1], q))
        return real(x, dt, A, B, C, state, q, need_state, out)

    monkeypatch.setattr(ssd_mod, "_block_group", spy)
    monkeypatch.setattr(ssd_mod, "GROUP_ELEMS", 1)  # one block per group, to see every block
    t = inputs(1, l, 4, 3, 1, 5, seed=22)
    _run(t)
    assert sum(length for length, _ in seen) == l
    assert all(length % q == 0 and q <= l for length, q in seen)
    assert ssd_mod.block_len(l, 8, 64, 1, 128) <= l


def test_block_len_depends_on_shape_and_device_only():
    # one block for short sequences (no states to pass), BLOCK positions for long ones, larger on CUDA
    assert ssd_mod.block_len(64, 8, 64, 1, 128) == 64
    assert ssd_mod.block_len(100, 8, 64, 1, 128) == 100
    assert ssd_mod.block_len(4096, 8, 64, 1, 128) == ssd_mod.BLOCK
    assert ssd_mod.block_len(4096, 8, 64, 1, 128, "cuda") == 2 * ssd_mod.BLOCK
    assert ssd_mod.block_len(0, 8, 64, 1, 128) == 1


@pytest.mark.parametrize("path", ["factored", "masked"])
def test_both_diagonal_paths_match_the_loop_with_gradients(monkeypatch, path):
    """The split mask (row/column scales) and the explicit mask, over several blocks and groups."""
    monkeypatch.setattr(ssd_mod, "FACTOR_RANGE", math.inf if path == "factored" else -1.0)
    monkeypatch.setattr(ssd_mod, "block_len", lambda *a, **k: 4)
    monkeypatch.setattr(ssd_mod, "GROUP_ELEMS", 200)  # 3 blocks per group, so the state crosses groups too
    t = inputs(2, 23, 4, 3, 2, 5, seed=23)
    names = ["x", "dt", "A", "B", "C", "D_hp", "z", "dt_bias", "init"]
    ours = {k: t[k].clone().requires_grad_() for k in names}
    ref = {k: t[k].double().clone().requires_grad_() for k in names}
    y, final = _run(ours)
    y_ref, final_ref = _loop(ref)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-4, atol=1e-4)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(24))
    wf = torch.randn(final.shape, generator=torch.Generator().manual_seed(25))
    ((y * w).sum() + (final * wf).sum()).backward()
    ((y_ref * w.double()).sum() + (final_ref * wf.double()).sum()).backward()
    for k in names:
        torch.testing.assert_close(ours[k].grad.double(), ref[k].grad, rtol=1e-3, atol=1e-3, msg=k)


def test_a_block_too_decayed_to_split_takes_the_masked_path(monkeypatch):
    """Large Δ in one block: the split scales would leave float32, so that group uses the explicit mask."""
    calls = []
    for name in ("factored_group", "_masked_group"):
        real = getattr(ssd_mod, name)
        monkeypatch.setattr(ssd_mod, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    t = inputs(1, 40, 4, 3, 1, 5, seed=26)
    t["dt"][:, :] = -10.0  # softplus(-10 + bias) ~ 1e-4: every block decays little
    _run(t)
    assert calls == ["factored_group"]
    t["dt"][:, 10:20] = 30.0  # Δ ~ 30 with A <= -0.5: the block's total log-decay is far beyond FACTOR_RANGE
    y, final = _run(t)
    assert calls[-1] == "_masked_group"
    y_ref, final_ref = _loop(t)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_state_passing_gradients_and_in_place_path(with_scale, with_state):
    """The block-to-block recurrence: its written-out adjoint against finite differences (float64), and the
    in-place path taken without autograd against the autograd one."""
    g = torch.Generator().manual_seed(2 * with_scale + with_state)
    b, c, groups, n, r, p = 2, 4, 2, 3, 2, 2

    def rand(*shape, low=None):
        t = torch.rand(*shape, generator=g, dtype=torch.float64)
        return (t + low if low is not None else t * 2 - 1).requires_grad_()

    local, decay = rand(b, c, groups, n, r, p), rand(b, c, groups, 1, r, 1, low=0.1)
    state = rand(b, groups, n, r, p) if with_state else None
    scale = rand(b, c, groups, 1, r, 1, low=0.5) if with_scale else None
    inputs = [t for t in (local, decay, state, scale) if t is not None]

    def passed(local, decay, *rest):
        rest = list(rest)
        st = rest.pop(0) if with_state else None
        return ssd_states.pass_states(local, decay, st, rest.pop(0) if with_scale else None)

    assert torch.autograd.gradcheck(passed, inputs)
    with torch.no_grad():
        in_place = ssd_states.pass_states(local.clone(), decay, state, scale)
    for a, b_ in zip(in_place, passed(*inputs), strict=True):
        torch.testing.assert_close(a, b_.detach())
