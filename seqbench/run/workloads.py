"""Workloads: what is timed at one grid point (docs/design.md, "Workloads").

Each builder does its untimed set-up and returns a ``Workload``: the callable to time, the tokens one call
processes and the FLOPs / bytes that call moves (for the roofline columns).

- prefill: one forward over b×L tokens in inference mode, returning last-position logits (what serving does).
- decode:  allocate the cache for L + warmup + new_tokens positions, prefill L context tokens (untimed), then
           each call is ONE step; exactly ``new_tokens`` steps are timed, each separately.
- train:   forward + backward of a next-token cross-entropy loss over b×L tokens (no optimizer step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seqbench.models.base import ModelCache, SeqModel


@dataclass
class Workload:
    call: Callable[[], object]
    tokens_per_call: int
    flops_per_call: int
    bytes_per_call: int | None = None  # bytes that must be read per call (decode: params + cache)
    per_step: bool = False  # True: a fixed number of calls, each one decode step
    cache: ModelCache | None = None
    cache_bytes: int | None = None  # decode: bytes of the cache at the context length


def _tokens(model: SeqModel, batch: int, length: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (batch, length), generator=g).to(device)


def prefill(model: SeqModel, batch: int, seq_len: int, device: torch.device, seed: int, **opts) -> Workload:
    tokens = _tokens(model, batch, seq_len, device, seed)
    chunk = opts.get("prefill_chunk")
    model.eval()

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return model.prefill(tokens, chunk_len=chunk)

    return Workload(call, batch * seq_len, batch * model.prefill_flops(seq_len))


def decode(model: SeqModel, batch: int, seq_len: int, device: torch.device, seed: int, **opts) -> Workload:
    new_tokens, warmup = opts["new_tokens"], opts.get("warmup", 0)
    model.eval()
    context = _tokens(model, batch, seq_len, device, seed)
    steps = _tokens(model, batch, warmup + new_tokens, device, seed + 1)
    cache = model.allocate_cache(batch, seq_len + warmup + new_tokens, device=device)
    with torch.inference_mode():
        model.prefill(context, cache, chunk_len=opts.get("prefill_chunk"))

    def call() -> torch.Tensor:
        i = cache.seqlen - seq_len
        with torch.inference_mode():
            return model.step(steps[:, i : i + 1], cache)

    # The bytes the model allocates to hold exactly seq_len positions: the same allocation code, on the meta
    # device (no memory). The timed cache is larger by the warmup + new_tokens positions it still has to fill.
    cache_bytes = model.allocate_cache(batch, seq_len, device="meta").nbytes()
    bytes_per_step = model.param_bytes() + cache_bytes
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
    return Workload(call, batch * seq_len, 3 * batch * model.prefill_flops(seq_len))


WORKLOADS: dict[str, Callable[..., Workload]] = {"prefill": prefill, "decode": decode, "train": train}
