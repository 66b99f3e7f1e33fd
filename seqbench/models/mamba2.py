"""Mamba-2 mixer (Dao & Gu, 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality", §7 "the Mamba-2 block").

    u ──in_proj──> [z | xBC | dt]        (z: gate, xBC: x, B, C projected in parallel, dt: one Δ per head)
    xBC ──causal depthwise conv1d (width d_conv) ──SiLU──> x (b, l, h, p), B, C (b, l, g, n)
    y = SSD(x, Δ = softplus(dt + dt_bias), A = -exp(A_log), B, C) + D x      (scalar A per head, §7)
    out = out_proj(RMSNorm(y * SiLU(z)))                                     (gated RMSNorm, per group)

Prefill runs the chunked SSD algorithm (``seqbench.ops.ssd``); decode updates the (h, p, n) state of each
head one token at a time. The constructor takes mamba_ssm's ``Mamba2`` arguments and the parameters have
its names and shapes (in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj), so a layer state_dict
of mamba_ssm or of Hugging Face transformers' ``Mamba2Mixer`` loads with ``strict=True``.

Cache (``allocate_cache``): ``conv_state`` (b, conv_dim, d_conv), the last d_conv inputs of the conv,
newest last, and ``ssm_state`` (b, nheads, headdim, d_state); both in the dtype asked for (the model dtype,
as mamba_ssm's ``allocate_inference_cache``). Neither depends on the context length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqbench.ops import REF_LABELS, get, tracks_grad
from seqbench.ops.conv import fill_conv_state
from seqbench.ops.gemm import Linear, linear
from seqbench.ops.norm import gated_rms_norm
from seqbench.ops.ssd import block_len, discretize_dt

# Positions per piece of a long inference prefill on the reference kernels: a multiple of the reference SSD's
# blocks and groups (ops/ssd.BLOCK, MAX_BLOCKS), small enough for a piece's activations to stay in the L3 cache.
PREFILL_PIECE = 1024


class GatedRMSNorm(nn.Module):
    """RMSNorm with a SiLU gate, normalised over groups of ``group_size`` channels (statistics in float32).

    norm_before_gate=False (Mamba-2 default): rmsnorm(y * silu(z)) * weight; True: rmsnorm(y) * weight * silu(z).
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        if dim % self.group_size:
            raise ValueError(f"group_size ({self.group_size}) must divide the normalised dimension ({dim})")
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, y: Tensor, z: Tensor | None = None) -> Tensor:
        return gated_rms_norm(y, z, self.weight, self.eps, self.group_size, self.norm_before_gate)


class Mamba2(nn.Module):
    """The Mamba-2 layer, (b, l, d_model) -> (b, l, d_model), with mamba_ssm's constructor arguments.

    ``d_ssm`` < d_inner applies the SSM to d_ssm channels only and a SiLU-gated MLP to the rest (as
    mamba_ssm); ``D_has_hdim`` gives D one value per channel instead of per head. ``impl`` selects the
    kernels (``seqbench.ops.get``): "auto", "ref" or "fast".
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        impl: str = "auto",
    ):
        super().__init__()
        # Parameters are drawn in float32 and cast at the end, so one seed gives the same layer in every dtype
        # (random init in bfloat16 draws different numbers) and bf16-vs-fp32 comparisons compare like with like.
        kw = {"device": device}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.headdim, self.ngroups, self.chunk_size, self.layer_idx = headdim, ngroups, chunk_size, layer_idx
        if self.d_ssm % headdim:
            raise ValueError(f"headdim ({headdim}) must divide d_ssm = {self.d_ssm}")
        if not 0 < self.d_ssm <= self.d_inner:
            raise ValueError(f"d_ssm ({self.d_ssm}) must be in 1..d_inner = {self.d_inner}")
        self.nheads = self.d_ssm // headdim
        if self.nheads % ngroups:
            raise ValueError(f"ngroups ({ngroups}) must divide the number of heads d_ssm / headdim = {self.nheads}")
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.d_mlp = self.d_inner - self.d_ssm  # channels of the gated-MLP side path (0 by default)

        # in_proj output order: [z0, x0 (MLP side path, empty by default), z, x, B, C, dt]
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = Linear(d_model, d_in_proj, bias=bias, **kw)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=conv_bias, **kw
        )
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        # Δ bias: Δ log-uniform in [dt_min, dt_max] (floored), stored as softplus^{-1}(Δ) = Δ + log(1 - e^{-Δ}).
        log_dt = torch.rand(self.nheads, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # Scalar A per head, A = -exp(A_log) with A uniform in A_init_range (S4D-real-like magnitudes).
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        if rmsnorm:
            self.norm = GatedRMSNorm(
                self.d_ssm, eps=1e-5, group_size=self.d_ssm // ngroups, norm_before_gate=norm_before_gate, **kw
            )
        self.out_proj = Linear(self.d_inner, d_model, bias=bias, **kw)
        if dtype is not None:
            self.to(dtype)

        dev = device or "cpu"
        self._ssd, l_ssd = get("ssd", impl, dev)
        # the blocks the FLOPs count: the fused kernel's chunk_size (last chunk padded), or the reference's own
        self._ssd_block = None if l_ssd == REF_LABELS["ssd"] else chunk_size
        self._conv, l_conv = get("causal_conv1d", impl, dev)
        self._conv_update, l_conv_up = get("causal_conv1d_update", impl, dev)
        self._state_update, l_step = get("selective_state_update", impl, dev)
        # A continued prefill (start > 0) hands causal_conv1d the cached inputs, which it takes only with
        # conv_dim % 8 == 0: otherwise `auto` uses the reference conv for those calls (`fast` refuses).
        conv_cont = "ref" if impl == "auto" and self.conv_dim % 8 else impl
        self._conv_cont, l_conv_cont = get("causal_conv1d", conv_cont, dev)
        self._continued = False  # whether the last forward continued a cached state
        self._labels = (
            "+".join(dict.fromkeys((l_ssd, l_conv, l_conv_up, l_step))),
            "+".join(dict.fromkeys((l_ssd, l_conv, l_conv_cont, l_conv_up, l_step))),
        )

    @property
    def impl_used(self) -> str:
        """The kernels of the last forward (and of step): a continued prefill adds the ones it fell back to."""
        return self._labels[self._continued]

    # --- pieces shared by forward and step ------------------------------------------------------
    def _in_sizes(self) -> list[int]:
        """Widths of in_proj's output parts z0, x0, z, xBC, dt."""
        return [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads]

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(..., d_in_proj) -> z0, x0, z, xBC, dt."""
        return zxbcdt.split(self._in_sizes(), dim=-1)

    def _in_projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """in_proj(x) as z0, x0, z, xBC, dt, each its own product with its rows of the weight, so each is a
        contiguous tensor: the conv reads xBC in place (a column slice of one product would be copied), and
        under autograd the backward of one product then split would concatenate the gradients into a fresh
        (b, l, d_in_proj) tensor (measured: 4-6% of a layer's forward+backward)."""
        sizes = self._in_sizes()
        bias = self.in_proj.bias
        biases = [None] * len(sizes) if bias is None else bias.split(sizes)
        return tuple(linear(x, w, b) for w, b in zip(self.in_proj.weight.split(sizes), biases, strict=True))

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight.view(self.conv_dim, self.d_conv)  # (conv_dim, w)

    def _D(self) -> Tensor:
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D  # (h, p) or (h,)

    def _dt_limited(self) -> bool:
        return self.dt_limit != (0.0, float("inf"))

    def _output(self, y: Tensor, z: Tensor, z0: Tensor, x0: Tensor) -> Tensor:
        """Gated norm (or nothing: the gate was applied inside the scan), MLP side path, out_proj."""
        if self.rmsnorm:
            y = self.norm(y, z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)  # (..., d_inner)
        return self.out_proj(y)

    # --- the mixer contract ---------------------------------------------------------------------
    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None, start: int = 0) -> Tensor:
        """x (b, l, d_model) at positions start..start+l-1 -> (b, l, d_model); with a cache, leaves the state."""
        if start > 0 and cache is None:
            raise ValueError("a prefill that starts after position 0 needs the cache of the earlier positions")
        if x.shape[1] > PREFILL_PIECE and self._ssd_block is None and not tracks_grad(x, *self.parameters()):
            return self._forward_in_pieces(x, cache, start)
        return self._forward(x, cache, start)

    def _forward_in_pieces(self, x: Tensor, cache: dict[str, Tensor] | None, start: int) -> Tensor:
        """An inference prefill on the reference kernels, PREFILL_PIECE positions at a time, each continuing
        the float32 state of the one before: every intermediate is piece-sized and stays in cache. The pieces
        are whole reference SSD blocks and groups, so the result is the one-call result."""
        b, l, _ = x.shape
        work = self.allocate_cache(b, 0, torch.float32, x.device)  # float32: no rounding between pieces
        if start > 0:
            for name, t in work.items():
                t.copy_(cache[name][:b])
        out = x.new_empty(b, l, self.d_model)  # (b, l, d_model)
        for s in range(0, l, PREFILL_PIECE):
            e = min(l, s + PREFILL_PIECE)
            out[:, s:e] = self._forward(x[:, s:e], work, start + s)
        if cache is not None:
            for name, t in work.items():
                cache[name][:b].copy_(t)
        self._continued = start > 0
        return out

    def _forward(self, x: Tensor, cache: dict[str, Tensor] | None, start: int) -> Tensor:
        b, l, _ = x.shape
        z0, x0, z, xBC, dt = self._in_projections(x)  # xBC (b, l, conv_dim), dt (b, l, h)
        xBC = xBC.transpose(1, 2)  # (b, conv_dim, l)
        conv_state = ssm_state = None
        if cache is not None:
            conv_state, ssm_state = cache["conv_state"][:b], cache["ssm_state"][:b]
        prev = conv_state if start > 0 else None
        self._continued = start > 0
        conv = self._conv_cont if self._continued else self._conv
        xBC_act = conv(xBC, self._conv_weight(), self.conv1d.bias, activation="silu", initial_state=prev)
        if conv_state is not None:
            if start == 0:
                conv_state.zero_()  # a fresh sequence: inputs before position 0 are zeros
            fill_conv_state(conv_state, xBC)
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        xs, B, C = xBC_act.transpose(1, 2).split([self.d_ssm, g * n, g * n], dim=-1)  # (b, l, *)
        dt_bias, softplus = self.dt_bias, True
        if self._dt_limited():  # discretise and clamp Δ here, as in step: every ssd kernel then agrees
            dt, dt_bias, softplus = discretize_dt(dt, dt_bias, True, self.dt_limit), None, False
        y = self._ssd(
            xs.reshape(b, l, h, p),
            dt,
            -torch.exp(self.A_log.float()),
            B.reshape(b, l, g, n),
            C.reshape(b, l, g, n),
            self.chunk_size,
            D=self._D(),
            z=None if self.rmsnorm else z.reshape(b, l, h, p),
            dt_bias=dt_bias,
            dt_softplus=softplus,
            initial_states=ssm_state if start > 0 else None,
            return_final_states=ssm_state is not None,
        )
        if ssm_state is not None:
            y, final = y
            ssm_state.copy_(final)
        return self._output(y.reshape(b, l, self.d_ssm), z, z0, x0)

    def step(self, x: Tensor, cache: dict[str, Tensor], pos: int) -> Tensor:
        """One token x (b, 1, d_model) at position ``pos``; updates conv and SSM state in place."""
        b = x.shape[0]
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        z0, x0, z, xBC, dt = self._split(self.in_proj(x.squeeze(1)))  # xBC (b, conv_dim), dt (b, h)
        conv_state, ssm_state = cache["conv_state"][:b], cache["ssm_state"][:b]
        xBC = self._conv_update(xBC, conv_state, self._conv_weight(), self.conv1d.bias, activation="silu")
        xs, B, C = xBC.split([self.d_ssm, g * n, g * n], dim=-1)
        A = (-torch.exp(self.A_log.float()))[:, None, None].expand(h, p, n)  # (h, p, n)
        D = self._D()
        D = D if D.dim() == 2 else D[:, None].expand(h, p)  # (h, p)
        dt_bias, softplus = self.dt_bias, True
        if self._dt_limited():  # the state-update kernel has no clamp: discretise Δ here, once per head
            dt, dt_bias, softplus = discretize_dt(dt, dt_bias, True, self.dt_limit), None, False
        dt = dt[:, :, None].expand(b, h, p)  # (b, h, p)
        dt_bias = None if dt_bias is None else dt_bias[:, None].expand(h, p)  # (h, p)
        y = self._state_update(
            ssm_state,
            xs.reshape(b, h, p),
            dt,
            A,
            B.reshape(b, g, n),
            C.reshape(b, g, n),
            D=D,
            z=None if self.rmsnorm else z.reshape(b, h, p),
            dt_bias=dt_bias,
            dt_softplus=softplus,
        )  # (b, h, p)
        return self._output(y.reshape(b, self.d_ssm), z, z0, x0).unsqueeze(1)

    def allocate_cache(
        self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> dict[str, Tensor]:
        """Zeroed conv and SSM state in ``dtype``; ``max_len`` is unused: the state does not grow."""
        return {
            "conv_state": torch.zeros(batch, self.conv_dim, self.d_conv, dtype=dtype, device=device),
            "ssm_state": torch.zeros(batch, self.nheads, self.headdim, self.d_state, dtype=dtype, device=device),
        }

    # --- accounting (2 FLOPs per multiply-add; elementwise exp/softplus/SiLU/norm not counted) -----
    def _proj_flops(self) -> int:
        return 2 * (self.in_proj.in_features * self.in_proj.out_features + self.d_inner * self.d_model)

    def ssd_blocks(self, seq_len: int) -> list[int]:
        """Positions per block of the SSD as it runs: the fused kernel pads the last of its chunk_size chunks;
        the reference blocks by shape (ops/ssd.block_len) and its last block is just shorter."""
        device = self.in_proj.weight.device  # where the reference would run, so its blocking
        q = self._ssd_block or block_len(seq_len, self.nheads, self.headdim, self.ngroups, self.d_state, device)
        full, rest = divmod(seq_len, q)
        if rest and self._ssd_block:
            return [q] * (full + 1)
        return [q] * full + ([rest] if rest else [])

    def prefill_flops(self, seq_len: int) -> int:
        """Per sequence of l tokens cut into blocks of q_i positions (``ssd_blocks``):

        l * (2 d (d_in_proj + d_inner) + 2 conv_dim d_conv + 2 d_ssm)          projections, conv, D skip
        + Σ_i 2 q_i^2 (g n + h p)                                               C B^T and the diagonal blocks
        + Σ_i (4 q_i + 2) h p n                                                 block states, readout, passing
        """
        blocks = self.ssd_blocks(seq_len)
        hpn = self.nheads * self.headdim * self.d_state
        per_token = self._proj_flops() + 2 * self.conv_dim * self.d_conv + 2 * self.d_ssm
        diag = 2 * sum(q * q for q in blocks) * (self.ngroups * self.d_state + self.nheads * self.headdim)
        return seq_len * per_token + diag + sum(4 * q + 2 for q in blocks) * hpn

    def step_flops(self, context_len: int) -> int:
        """Independent of context_len: 2 d (d_in_proj + d_inner) + 2 conv_dim d_conv + 5 h p n + 2 d_ssm
        (state decay 1 + input multiply-add 2 + readout 2 FLOPs per state element)."""
        hpn = self.nheads * self.headdim * self.d_state
        return self._proj_flops() + 2 * self.conv_dim * self.d_conv + 5 * hpn + 2 * self.d_ssm
