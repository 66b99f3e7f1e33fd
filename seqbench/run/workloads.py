"""Workloads: what is timed at one grid point (docs/design.md, "What a point measures").

Each builder does its untimed set-up and returns a ``Workload``: the callable to time, the tokens one call
processes, the FLOPs / bytes that call moves (for the roofline columns) and the cache it holds.

- prefill: serving's prefill. The cache for seq_len positions is allocated once, before timing; every call
           overwrites it from position 0 (K/V written, final SSM state kept) and returns the last position's
           logits. ``prefill_chunk`` feeds the prompt through the whole stack in chunks of that many tokens.
- decode:  allocate the cache for L + 1 positions and prefill L context tokens (untimed); every call is ONE
           step at context L (the position is rewound to L before each, so the cache never fills, whatever
           warmup and new_tokens are); exactly ``new_tokens`` steps are timed, each separately. With
           ``cuda_graph`` the step is captured in a CUDA graph on the first call and replayed (run/cudagraph.py).
- train:   forward + backward of a next-token cross-entropy loss over b×L tokens (no optimizer step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seqbench.models.base import ModelCache, SeqModel
from seqbench.run.cudagraph import GraphedDecode


@dataclass
class Workload:
    call: Callable[[], object]
    tokens_per_call: int
    flops_per_call: int
    bytes_per_call: int | None = None  # bytes that must be read per call (decode: weights read + cache)
    per_step: bool = False  # True: a fixed number of calls, each one decode step
    cache: ModelCache | None = None  # allocated before timing; live during every call
    cache_bytes: int | None = None  # bytes of the cache at the context length (seq_len positions)


def _tokens(model: SeqModel, batch: int, length: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (batch, length), generator=g).to(device)


def prefill(model: SeqModel, batch: int, seq_len: int, device: torch.device, seed: int, **opts) -> Workload:
    tokens = _tokens(model, batch, seq_len, device, seed)
    chunk = opts.get("prefill_chunk")
    model.eval()
    cache = model.allocate_cache(batch, seq_len, device=device)

    def call() -> torch.Tensor:
        cache.seqlen = 0  # every call is a fresh prompt, written over the previous one
        with torch.inference_mode():
            return model.prefill(tokens, cache, chunk_len=chunk)  # (b, vocab)

    return Workload(call, batch * seq_len, batch * model.prefill_flops(seq_len), cache=cache,
                    cache_bytes=cache.nbytes())


def decode(model: SeqModel, batch: int, seq_len: int, device: torch.device, seed: int, **opts) -> Workload:
    graphed = opts.get("cuda_graph", False)
    model.eval()
    context = _tokens(model, batch, seq_len, device, seed)
    token = _tokens(model, batch, 1, device, seed + 1)
    cache = model.allocate_cache(batch, seq_len + 1, device=device)
    with torch.inference_mode():
        model.prefill(context, cache, chunk_len=opts.get("prefill_chunk"))

    def step() -> torch.Tensor:
        cache.seqlen = seq_len  # each step is the one at context seq_len (its K/V slot is overwritten)
        with torch.inference_mode():
            return model.step(token, cache)  # (b, vocab)

    # on CUDA: that step captured on the first call, replayed for every later one
    call = GraphedDecode(model, cache, token, seq_len) if graphed else step

    # The bytes the model allocates to hold exactly seq_len positions: the same allocation code, on the meta
    # device (no memory). The timed cache has one more position, the slot each step writes.
    cache_bytes = model.allocate_cache(batch, seq_len, device="meta").nbytes()
    bytes_per_step = model.step_read_bytes(batch) + cache_bytes
    return Workload(call, batch, batch * model.step_flops(seq_len), bytes_per_step, per_step=True, cache=cache,
                    cache_bytes=cache_bytes)


def train(model: SeqModel, batch: int, seq_len: int, device: torch.device, seed: int, **opts) -> Workload:
    tokens = _tokens(model, batch, seq_len + 1, device, seed)
    model.train()

    def call() -> None:
        logits = model(tokens[:, :-1])  # (b, l, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    # backward costs about twice the forward (one matmul for input grads, one for weight grads)
    return Workload(call, batch * seq_len, 3 * batch * model.forward_flops(seq_len))


WORKLOADS: dict[str, Callable[..., Workload]] = {"prefill": prefill, "decode": decode, "train": train}
