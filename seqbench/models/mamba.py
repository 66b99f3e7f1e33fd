"""Mamba-1 mixer (Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", §3, Fig. 3).

    x -> in_proj -> [x, z];  x -> causal depthwise conv (width d_conv) -> SiLU
      -> x_proj -> [dt (rank r), B (n), C (n)];  Δ = softplus(dt_proj(dt))
      -> selective scan  h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t,  y_t = C_t h_t + D x_t
      -> y * SiLU(z) -> out_proj

Parameter names, shapes and initialisation follow mamba_ssm's ``Mamba`` layer (S4D-real A = -(1..n) stored as
``A_log``; Δ initialised log-uniformly in [dt_min, dt_max] through the inverse softplus in ``dt_proj.bias``), so a
mamba_ssm or Hugging Face ``MambaMixer`` layer state_dict loads with ``strict=True`` and computes the same function.

Cache (per layer): ``conv_state`` (b, d_inner, d_conv), the last d_conv conv inputs, newest last, and
``ssm_state`` (b, d_inner, d_state). Both are in the dtype passed to ``allocate_cache`` (the model dtype, as
mamba_ssm allocates them); every update is computed in float32 and written back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from seqbench.ops import get
from seqbench.ops.conv import fill_conv_state
from seqbench.ops.gemm import Linear, linear


class Mamba(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        impl: str = "auto",
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path  # mamba_ssm constructor compatibility; `impl` selects kernels
        self.layer_idx = layer_idx

        self.in_proj = Linear(d_model, 2 * self.d_inner, bias=bias, **kw)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias, **kw
        )
        self.x_proj = Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **kw)
        self.dt_proj = Linear(self.dt_rank, self.d_inner, bias=True, **kw)
        # S4D-real initialisation (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal SSMs"):
        # A[:, i] = -(i + 1), stored as log so that A = -exp(A_log) stays negative under training.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)  # (d_inner, n)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.out_proj = Linear(self.d_inner, d_model, bias=bias, **kw)
        self._init_dt(dt_init, dt_scale, dt_min, dt_max, dt_init_floor)

        dev = device or "cpu"
        self._conv, l_conv = get("causal_conv1d", impl, dev)
        self._conv_update, l_conv_up = get("causal_conv1d_update", impl, dev)
        self._scan, l_scan = get("selective_scan", impl, dev)
        self._state_update, l_step = get("selective_state_update", impl, dev)
        # A continued prefill (start > 0) starts from the cached state, which mamba_ssm's selective_scan_fn cannot
        # take and causal_conv1d takes only with channels % 8 == 0: under `auto` those calls use the reference.
        # (`fast` keeps the fast kernels, which refuse; the sweep's preflight stops such a config first.)
        cont = "ref" if impl == "auto" else impl
        self._scan_cont, l_scan_cont = get("selective_scan", cont, dev)
        self._conv_cont, l_conv_cont = get("causal_conv1d", cont if self.d_inner % 8 else impl, dev)
        self._continued = False  # whether the last forward continued a cached state
        self._labels = (
            self._label(l_conv, l_scan, l_conv_up, l_step),
            self._label(l_conv, l_scan, l_conv_cont, l_scan_cont, l_conv_up, l_step),
        )

    @staticmethod
    def _label(*labels: str) -> str:
        """One 'torch-chunked' when every kernel is the torch reference, else every distinct kernel in order."""
        return "torch-chunked" if all(l.startswith("torch") for l in labels) else "+".join(dict.fromkeys(labels))

    @property
    def impl_used(self) -> str:
        """The kernels of the last forward (and of step): a continued prefill adds the ones it fell back to."""
        return self._labels[self._continued]

    @torch.no_grad()
    def _init_dt(self, dt_init: str, dt_scale: float, dt_min: float, dt_max: float, floor: float) -> None:
        """dt_proj.weight ~ U(-s, s) (or = s) with s = dt_scale / sqrt(dt_rank); dt_proj.bias = softplus^-1(Δ0),
        Δ0 log-uniform in [dt_min, dt_max] and at least ``floor`` (Mamba paper §3.6 and its code)."""
        std = dt_scale * self.dt_rank**-0.5
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got '{dt_init}'")
        u = torch.rand(self.d_inner, device=self.dt_proj.bias.device)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.dt_proj.bias._no_reinit = True  # markers mamba_ssm's model init looks for
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def _A(self) -> Tensor:
        return -torch.exp(self.A_log.float())  # (d_inner, n)

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None, start: int = 0) -> Tensor:
        b, l, _ = x.shape
        if start > 0 and cache is None:
            raise ValueError("a prefill that starts after position 0 needs the cache of the earlier positions")
        e, w_in, b_in = self.d_inner, self.in_proj.weight, self.in_proj.bias
        # Everything stays time-major, (b, l, channels) in memory: the conv and the scan read that layout
        # directly (their (b, d, l) arguments are transposed views), so nothing is transposed in between.
        xc = linear(x, w_in[:e], None if b_in is None else b_in[:e]).transpose(1, 2)  # (b, d_inner, l)
        z = linear(x, w_in[e:], None if b_in is None else b_in[e:])  # (b, l, d_inner)
        conv_state = ssm_state = None
        if cache is not None:
            conv_state, ssm_state = cache["conv_state"][:b], cache["ssm_state"][:b]
        self._continued = start > 0
        conv, scan = (self._conv_cont, self._scan_cont) if self._continued else (self._conv, self._scan)
        xs = conv(
            xc, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
            initial_state=conv_state if start > 0 else None,
        )  # (b, d_inner, l)
        if conv_state is not None:
            if start == 0:
                conv_state.zero_()  # positions before 0 are zeros, as in the convolution's padding
            fill_conv_state(conv_state, xc)
        dt, B, C = linear(xs.transpose(1, 2), self.x_proj.weight).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)  # (b, l, *)
        dt = linear(dt, self.dt_proj.weight)  # (b, l, d_inner), bias added in the scan
        out = scan(
            xs, dt.transpose(1, 2), self._A(), B.transpose(1, 2), C.transpose(1, 2), self.D.float(),
            z.transpose(1, 2),  # B, C: (b, n, l)
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            initial_state=ssm_state if start > 0 else None, return_final_state=ssm_state is not None,
        )
        if ssm_state is not None:
            y, last = out
            ssm_state.copy_(last)
        else:
            y = out
        return self.out_proj(y.transpose(1, 2))  # (b, l, d_model)

    def step(self, x: Tensor, cache: dict[str, Tensor], pos: int) -> Tensor:
        """One token x (b, 1, d_model) at position ``pos``; conv and SSM states advance in place."""
        b = x.shape[0]
        xc, z = self.in_proj(x[:, 0]).chunk(2, dim=-1)  # (b, d_inner) each
        xs = self._conv_update(
            xc, cache["conv_state"][:b], self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu"
        )
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)  # (b, r), (b, n) x2
        dt = linear(dt, self.dt_proj.weight)  # (b, d_inner), bias added in the state update
        y = self._state_update(
            cache["ssm_state"][:b], xs, dt, self._A(), B, C, self.D.float(), z,
            dt_bias=self.dt_proj.bias.float(), dt_softplus=True,
        )  # (b, d_inner)
        return self.out_proj(y).unsqueeze(1)  # (b, 1, d_model)

    def allocate_cache(
        self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> dict[str, Tensor]:
        """Zeroed conv and SSM state in ``dtype``; ``max_len`` is unused: the state does not grow with context."""
        return {
            "conv_state": torch.zeros(batch, self.d_inner, self.d_conv, dtype=dtype, device=device),
            "ssm_state": torch.zeros(batch, self.d_inner, self.d_state, dtype=dtype, device=device),
        }

    # --- accounting (2 FLOPs per multiply-add; SiLU, softplus, D skip and gate products not counted) ----
    def _token_flops(self) -> int:
        """Per token: projections 2 (d 2e + e (r + 2n) + r e + e d), conv 2 e w, scan 9 e n, with e = d_inner.

        The scan's 9 per state element (the convention of mamba_ssm's selective-scan FLOP count) covers the
        discretisation Δ·A, exp(Δ A), Δ·B·x, the update a·h + b and the readout C·h.
        """
        d, e, n, r = self.d_model, self.d_inner, self.d_state, self.dt_rank
        proj = 2 * (d * 2 * e + e * (r + 2 * n) + r * e + e * d)
        return proj + 2 * e * self.d_conv + 9 * e * n

    def prefill_flops(self, seq_len: int) -> int:
        """seq_len times the per-token cost: the recurrence does the same work at every position."""
        return seq_len * self._token_flops()

    def step_flops(self, context_len: int) -> int:
        """The per-token cost, independent of context_len (conv update 2 e w, state update 9 e n)."""
        return self._token_flops()
