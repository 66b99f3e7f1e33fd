"""seqbench's mixers against their peers: ``python benchmarks/peers.py`` (part of ``make bench``).

Peers, all pure PyTorch on the CPU, each holding the same weights as seqbench's layer (state_dict copied, no
download) and fed the same input:
- Mamba-2: transformers' ``Mamba2Mixer`` (its torch path: no fused kernel exists here);
- Mamba: transformers' ``MambaMixer`` (its sequential torch path) and the ``mambapy`` package's
  ``MambaBlock`` (parallel scan);
- attention: transformers' ``LlamaAttention`` (SDPA) with its rotary embedding;
- S4D has no peer; its row is there for the per-token check.
A peer in ``SKIPS`` is not run beyond the length given there, with the reason printed under the table
(transformers' Mamba forward+backward costs O(L^2) memory traffic and does not finish at L = 4096).

Defaults: one layer, d_model 256, float32, mamba_ssm's default Mamba-2 settings (d_state 128, headdim 64,
chunk_size 256), Mamba d_state 16, attention head_dim 64; shapes (b=1, L=4096) and (b=64, L=64); forward
(inference mode) and forward+backward (training mode, gradients of the input and every weight).

Timing: one warm-up call each, then ``--repeats`` rounds that call seqbench and every peer in turn, so all
see the same machine load. The table gives medians, the ratio peer / seqbench, seqbench's microseconds per
token and the fraction of the measured roofline it reached: the layers' analytic FLOPs (``prefill_flops``,
times 3 for forward+backward) over time, divided by the peak matmul FLOP/s that ``seqbench calibrate``
measures. The checks at the end: the targets of the ratios, and per kind, the per-token cost at the small
shape within 1.5x of that at the long one.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from seqbench.models.attention import Attention
from seqbench.models.mamba import Mamba
from seqbench.models.mamba2 import Mamba2
from seqbench.models.s4 import S4D
from seqbench.run.calibration import calibrate

# (kind, peer, mode) -> the least speed-up (peer median / seqbench median) asked for
TARGETS = {
    ("mamba2", "transformers", "fwd"): 4.0,
    ("mamba2", "transformers", "fwd+bwd"): 4.0,
    ("mamba", "transformers", "fwd"): 5.0,
}
# (kind, peer, mode) -> (longest L run, why): peers that cannot finish at longer sequences in useful time
SKIPS = {
    ("mamba", "transformers", "fwd+bwd"): (
        1024,
        "its sequential path indexes a (b, d, L, n) tensor once per step, and the backward of every index "
        "zero-fills a gradient of that tensor's full size: O(L^2) memory traffic (over 20 min at L = 4096)",
    ),
}
PER_TOKEN_LIMIT = 1.5  # small-shape per-token cost over the long shape's
KINDS = ("mamba2", "mamba", "attention", "s4d")


class Stack(nn.Module):
    """``layers`` mixers applied one after the other (no norms or residuals: the mixers are what is compared)."""

    def __init__(self, layers: list[nn.Module], flops: Callable[[int], int] | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self._flops = flops

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x[0] if isinstance(x, tuple) else x

    def prefill_flops(self, seq_len: int) -> int:
        return sum(layer.prefill_flops(seq_len) for layer in self.layers)


class _Llama(nn.Module):
    """transformers' LlamaAttention with the rotary embedding it needs, as a (b, l, d) -> (b, l, d) layer."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

        self.attn, self.rotary = LlamaAttention(config, layer_idx=0), LlamaRotaryEmbedding(config)

    def forward(self, x: Tensor) -> Tensor:
        positions = torch.arange(x.shape[1], device=x.device)[None]
        return self.attn(x, position_embeddings=self.rotary(x, positions), attention_mask=None)[0]


def _mamba2(d: int, seed: int) -> tuple[nn.Module, dict[str, nn.Module]]:
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    torch.manual_seed(seed)
    ours = Mamba2(d, d_state=128, headdim=64, chunk_size=256)
    cfg = Mamba2Config(hidden_size=d, num_heads=ours.nheads, head_dim=64, state_size=128, n_groups=1, expand=2,
                       conv_kernel=ours.d_conv, chunk_size=256, num_hidden_layers=1, layer_norm_epsilon=1e-5,
                       use_bias=False, use_conv_bias=True)
    return ours, {"transformers": Mamba2Mixer(cfg, layer_idx=0)}


def _mamba(d: int, seed: int) -> tuple[nn.Module, dict[str, nn.Module]]:
    from mambapy.mamba import MambaBlock
    from mambapy.mamba import MambaConfig as PyConfig
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    torch.manual_seed(seed)
    ours = Mamba(d, d_state=16, expand=2)
    cfg = MambaConfig(hidden_size=d, state_size=16, expand=2, conv_kernel=ours.d_conv, time_step_rank=ours.dt_rank,
                      num_hidden_layers=1, use_bias=False, use_conv_bias=True, use_mambapy=False)
    py_cfg = PyConfig(d_model=d, n_layers=1, dt_rank=ours.dt_rank, d_state=16, expand_factor=2, d_conv=ours.d_conv)
    return ours, {"transformers": MambaMixer(cfg, layer_idx=0), "mambapy": MambaBlock(py_cfg)}


def _attention(d: int, seed: int) -> tuple[nn.Module, dict[str, nn.Module]]:
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    heads = max(1, d // 64)
    ours = Attention(d, heads)
    cfg = LlamaConfig(hidden_size=d, num_attention_heads=heads, num_key_value_heads=heads, attention_bias=False,
                      max_position_embeddings=1 << 16, rope_theta=ours.rope_theta)
    cfg._attn_implementation = "sdpa"
    return ours, {"transformers": _Llama(cfg)}


def _attention_state(ours: Attention) -> dict[str, Tensor]:
    """seqbench's fused kv_proj split into Llama's k_proj and v_proj (k first, as ``Attention._qkv`` reads it)."""
    k, v = ours.kv_proj.weight.chunk(2, dim=0)
    return {"attn.q_proj.weight": ours.q_proj.weight, "attn.k_proj.weight": k, "attn.v_proj.weight": v,
            "attn.o_proj.weight": ours.out_proj.weight}


def build(kind: str, d: int, layers: int) -> tuple[Stack, dict[str, Stack]]:
    """seqbench's stack of ``layers`` mixers of ``kind`` and each peer's, holding the same weights."""
    ours, peers = [], {}
    for i in range(layers):
        if kind == "s4d":
            torch.manual_seed(i)
            ours.append(S4D(d))
            continue
        mine, theirs = {"mamba2": _mamba2, "mamba": _mamba, "attention": _attention}[kind](d, seed=i)
        state = _attention_state(mine) if kind == "attention" else mine.state_dict()
        for name, layer in theirs.items():
            layer.load_state_dict(state, strict=True)
            peers.setdefault(name, []).append(layer)
        ours.append(mine)
    return Stack(ours), {name: Stack(ls) for name, ls in peers.items()}


@dataclass
class Case:
    kind: str
    batch: int
    length: int
    mode: str  # "fwd" or "fwd+bwd"
    times: dict[str, list[float]]  # "seqbench" and each peer -> seconds per call
    flops: int
    parity: dict[str, float]  # peer -> max |y_peer - y_ours| / max |y_ours|
    skipped: dict[str, str]  # peer -> why it was not run at this shape


def _caller(model: Stack, x: Tensor, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        def fwd():
            with torch.inference_mode():
                return model(x)
        return fwd
    params = list(model.parameters())
    xg = x.clone().requires_grad_()

    def fwd_bwd():
        xg.grad = None
        for p in params:
            p.grad = None
        model(xg).sum().backward()
    return fwd_bwd


def measure(kind: str, ours: Stack, peers: dict[str, Stack], batch: int, length: int, mode: str,
            repeats: int) -> Case:
    x = torch.randn(batch, length, ours.layers[0].d_model, generator=torch.Generator().manual_seed(1))
    rules = {n: SKIPS[kind, n, mode] for n in peers if (kind, n, mode) in SKIPS}
    skipped = {n: why for n, (longest, why) in rules.items() if length > longest}
    peers = {n: m for n, m in peers.items() if n not in skipped}
    models = {"seqbench": ours, **peers}
    for m in models.values():
        m.train(mode != "fwd")
    with torch.inference_mode():
        ref = ours(x)
        parity = {n: ((m(x) - ref).abs().max() / ref.abs().max()).item() for n, m in peers.items()}
    calls = {name: _caller(m, x, mode) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()  # warm-up: allocator, thread pool, lazy imports
    for _ in range(repeats):
        for name, fn in calls.items():  # interleaved: every side sees the same load
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    flops = batch * ours.prefill_flops(length) * (3 if mode == "fwd+bwd" else 1)
    return Case(kind, batch, length, mode, times, flops, parity, skipped)


def report(cases: list[Case], peak_flops: float) -> list[str]:
    """The table, then the checks; returns the checks that failed."""
    head = (f"{'kind':<10}{'b x L':>9} {'mode':<8}{'seqbench ms':>12}{'µs/token':>9}{'roofline':>9}  "
            f"{'peer':<13}{'peer ms':>10}{'ratio':>8}{'target':>7}  parity")
    print(head)
    print("-" * len(head))
    missed, skips = [], set()
    for c in cases:
        ours = statistics.median(c.times["seqbench"])
        per_token = ours / (c.batch * c.length) * 1e6
        frac = c.flops / ours / peak_flops
        prefix = f"{c.kind:<10}{f'{c.batch}x{c.length}':>9} {c.mode:<8}{ours * 1e3:>12.1f}{per_token:>9.2f}{frac:>9.1%}"
        peers = [n for n in c.times if n != "seqbench"] + list(c.skipped)
        if not peers:
            print(f"{prefix}  {'(no peer)':<13}")
        for name in peers:
            if name in c.skipped:
                print(f"{prefix}  {name:<13}{'skipped':>10}   (see below)")
                skips.add((c.kind, name, c.mode))
                prefix = " " * len(prefix)
                continue
            theirs = statistics.median(c.times[name])
            ratio, target = theirs / ours, TARGETS.get((c.kind, name, c.mode))
            verdict = "" if target is None else f"{target:>6.0f}x"
            if target is not None and ratio < target:
                missed.append(f"{c.kind} {c.mode} {c.batch}x{c.length}: {ratio:.1f}x vs {name} < {target:.0f}x")
            print(f"{prefix}  {name:<13}{theirs * 1e3:>10.1f}{ratio:>7.1f}x{verdict:>7}  {c.parity[name]:.1e}")
            prefix = " " * len(prefix)
    by_key = {(c.kind, c.mode, c.batch, c.length): c for c in cases}
    print(f"\nper-token cost, small shape over long shape (limit {PER_TOKEN_LIMIT}x):")
    for (kind, mode, b, length), c in by_key.items():
        for (k2, m2, b2, l2), c2 in by_key.items():
            if (k2, m2) != (kind, mode) or not (b > b2 and length < l2):
                continue
            small = statistics.median(c.times["seqbench"]) / (b * length)
            long = statistics.median(c2.times["seqbench"]) / (b2 * l2)
            ratio = small / long
            ok = ratio <= PER_TOKEN_LIMIT
            if not ok:
                missed.append(f"{kind} {mode} per token {b}x{length} / {b2}x{l2} = {ratio:.2f}")
            print(f"  {kind:<10}{mode:<8} {b}x{length} / {b2}x{l2}: {ratio:.2f}x {'ok' if ok else 'MISSED'}")
    for kind, name, mode in sorted(skips):
        longest, why = SKIPS[kind, name, mode]
        print(f"\nskipped: {name} {kind} {mode} beyond L = {longest}: {why}.")
    print("\nroofline: analytic FLOPs (the blocks each kernel runs) / time / peak matmul FLOP/s.")
    print("\ntargets " + ("all met" if not missed else "missed:\n  " + "\n  ".join(missed)))
    return missed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/peers.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--shapes", default="1x4096,64x64", help="comma-separated BxL")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every peer is built from a config in code
    torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its notes that the fused CUDA kernels are not installed
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")]
    kinds = [k for k in a.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        ap.error(f"unknown kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    host = calibrate(torch.device("cpu"))
    peak = host["peak_flops_per_s"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"seqbench peers: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads={a.threads}, float32, d_model={a.d_model}, layers={a.layers}, repeats={a.repeats}, "
          f"peak {peak / 1e9:.0f} GFLOP/s ({host['gemm']} GEMM) and {host['peak_bytes_per_s'] / 1e9:.0f} GB/s "
          f"copy (measured: a host shared with other work shows lower figures), load average {load:.2f}")
    cases = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes about missing fast kernels
        for kind in kinds:
            ours, peers = build(kind, a.d_model, a.layers)
            for b, length in shapes:
                for mode in a.modes.split(","):
                    print(f"  measuring {kind} {b}x{length} {mode}", file=sys.stderr, flush=True)
                    cases.append(measure(kind, ours, peers, b, length, mode, a.repeats))
    report(cases, peak)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
