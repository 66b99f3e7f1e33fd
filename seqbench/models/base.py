"""The model contract shared by every mixer, the residual Block and the SeqModel stack.

Mixer contract (docs/design.md, "The mixer contract"), with one addition: absolute positions are passed explicitly.

- ``forward(x, cache=None, start=0) -> y``: x (b, l, d) holds positions ``start .. start+l-1``.
  With a cache it is a prefill: it reads the state left by positions ``< start`` (when ``start > 0``)
  and leaves the state after position ``start+l-1`` (SSMs) or the K/V of those positions (attention).
- ``step(x, cache, pos) -> y``: x (b, 1, d) is the token at position ``pos``; updates ``cache`` in place.
  ``pos`` is an int, or a (1,) integer tensor on the device (a step captured in a CUDA graph: static shapes,
  no host read); mixers whose state does not depend on the position ignore it.
- ``allocate_cache(batch, max_len, dtype, device) -> dict[str, Tensor]``: allocated once, before timing.
- ``prefill_flops(seq_len)``: forward FLOPs (2 per multiply-add) of one sequence of ``seq_len`` tokens that
  leaves its cache (K/V written, final state kept), as serving's prefill does;
  ``step_flops(context_len)``: FLOPs of one decode step with ``context_len`` tokens already cached.
- ``impl_used``: the label of the kernels this mixer runs (recorded on every result row).

The position is an argument rather than a tensor inside the cache so that ``cache_bytes`` is exactly the
bytes of K/V or of the recurrent state, with nothing else mixed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from seqbench.ops.gemm import Linear


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019); statistics in float32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """Gated MLP of LLaMA (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate = Linear(d_model, d_hidden, bias=False)
        self.up = Linear(d_model, d_hidden, bias=False)
        self.down = Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))

    def flops_per_token(self) -> int:
        return 2 * 3 * self.gate.in_features * self.gate.out_features


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then optionally x + mlp(norm(x))."""

    def __init__(self, d_model: int, mixer: nn.Module, mlp_hidden: int | None = None, eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.mixer = mixer
        self.mlp = SwiGLU(d_model, mlp_hidden) if mlp_hidden else None
        self.mlp_norm = RMSNorm(d_model, eps) if mlp_hidden else None

    def _mlp(self, x: Tensor) -> Tensor:
        if self.mlp is None:
            return x
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None, start: int = 0) -> Tensor:
        x = x + self.mixer(self.norm(x), cache, start)
        return self._mlp(x)

    def step(self, x: Tensor, cache: dict[str, Tensor], pos: int | Tensor) -> Tensor:
        x = x + self.mixer.step(self.norm(x), cache, pos)
        return self._mlp(x)

    def extra_flops_per_token(self) -> int:
        return self.mlp.flops_per_token() if self.mlp is not None else 0


@dataclass
class ModelCache:
    """Per-layer cache tensors plus how many positions they already hold."""

    layers: list[dict[str, Tensor]]
    max_len: int
    seqlen: int = 0

    def tensors(self) -> list[Tensor]:
        return [t for layer in self.layers for t in layer.values()]

    def nbytes(self) -> int:
        """Bytes of every tensor the model allocated for its cache (counted, not a formula)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dtype_label(self) -> str:
        """The dtypes of the cache tensors, e.g. ``float32`` or ``bfloat16+float32`` (S4D state in float32)."""
        return "+".join(dict.fromkeys(str(t.dtype).removeprefix("torch.") for t in self.tensors()))


class SeqModel(nn.Module):
    """Token embedding -> blocks -> final norm -> LM head (untied)."""

    def __init__(self, vocab_size: int, d_model: int, mixers: list[nn.Module], mlp_hidden: int | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, m, mlp_hidden) for m in mixers)
        self.norm = RMSNorm(d_model)
        self.head = Linear(d_model, vocab_size, bias=False)

    # --- inference -------------------------------------------------------------------------------
    def forward(self, tokens: Tensor) -> Tensor:
        """Full forward without cache: tokens (b, l) -> logits (b, l, vocab)."""
        x = self.embed(tokens)  # (b, l, d)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def _run_chunk(self, tokens: Tensor, cache: ModelCache) -> Tensor:
        start = cache.seqlen
        if start + tokens.shape[1] > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} positions; cannot prefill to {start + tokens.shape[1]}")
        x = self.embed(tokens)  # (b, l, d)
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            x = block(x, layer_cache, start)
        cache.seqlen = start + tokens.shape[1]
        return x

    def prefill(self, tokens: Tensor, cache: ModelCache | None = None, chunk_len: int | None = None) -> Tensor:
        """Process a prompt and return the logits of its last position, (b, vocab).

        With ``chunk_len``, the prompt is fed in chunks through the whole stack, carrying each layer's cache,
        so activation memory is O(chunk_len) instead of O(l) (a cache is allocated if none is given).
        """
        b, l = tokens.shape
        if cache is None and chunk_len is None:
            x = self.embed(tokens)  # (b, l, d)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x[:, -1]))
        if cache is None:
            cache = self.allocate_cache(b, l, dtype=self.embed.weight.dtype, device=tokens.device)
        step = chunk_len or l
        for s in range(0, l, step):
            x = self._run_chunk(tokens[:, s : s + step], cache)
        return self.head(self.norm(x[:, -1]))

    def step(self, token: Tensor, cache: ModelCache) -> Tensor:
        """One decode step: token (b, 1) at position cache.seqlen -> logits (b, vocab)."""
        pos = cache.seqlen
        if pos >= cache.max_len:
            raise ValueError(f"cache is full ({cache.max_len} positions)")
        logits = self.step_at(token, cache, pos)
        cache.seqlen = pos + 1
        return logits

    def step_at(self, token: Tensor, cache: ModelCache, pos: int | Tensor) -> Tensor:
        """The decode step at an explicit position, leaving ``cache.seqlen`` to the caller.

        With ``pos`` a (1,) integer tensor on the model's device, nothing is read back to the host and every
        shape is static, so the call can be captured once in a CUDA graph and replayed (the graph advances pos).
        """
        x = self.embed(token)  # (b, 1, d)
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            x = block.step(x, layer_cache, pos)
        return self.head(self.norm(x[:, -1]))

    def allocate_cache(
        self, batch: int, max_len: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> ModelCache:
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        layers = [blk.mixer.allocate_cache(batch, max_len, dtype, device) for blk in self.blocks]
        return ModelCache(layers=layers, max_len=max_len)

    # --- accounting ------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed.weight.numel() + self.head.weight.numel()
        return total

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def impl_used(self) -> str:
        """Distinct kernel labels of the mixers, in layer order, joined by '+'."""
        labels: list[str] = []
        for blk in self.blocks:
            if blk.mixer.impl_used not in labels:
                labels.append(blk.mixer.impl_used)
        return "+".join(labels)

    def _head_flops(self) -> int:
        return 2 * self.d_model * self.vocab_size

    def _block_token_flops(self) -> int:
        return sum(b.extra_flops_per_token() for b in self.blocks)

    def prefill_flops(self, seq_len: int) -> int:
        """FLOPs of one serving prefill (batch 1) of seq_len tokens: every layer over every token, the cache
        written, and the LM head once, for the last position (the only logits a prefill returns)."""
        mixers = sum(b.mixer.prefill_flops(seq_len) for b in self.blocks)
        return seq_len * self._block_token_flops() + mixers + self._head_flops()

    def forward_flops(self, seq_len: int) -> int:
        """FLOPs of the full forward (batch 1) that training runs: logits at every position."""
        return self.prefill_flops(seq_len) + (seq_len - 1) * self._head_flops()

    def step_flops(self, context_len: int) -> int:
        """FLOPs of one decode step (batch 1) with context_len tokens already cached."""
        mixers = sum(b.mixer.step_flops(context_len) for b in self.blocks)
        return self._block_token_flops() + mixers + self._head_flops()

    def step_read_bytes(self, batch: int) -> int:
        """Parameter bytes one decode step reads: every weight except the embedding table, of which it reads
        one row per sequence. The cache it reads comes on top (see ModelCache.nbytes)."""
        table = self.embed.weight
        row_bytes = table.shape[1] * table.element_size()
        return self.param_bytes() - table.numel() * table.element_size() + batch * row_bytes
