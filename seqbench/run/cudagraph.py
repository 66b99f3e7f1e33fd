"""Decode steps replayed from a CUDA graph (docs/design.md, "The GPU path").

A one-token step of a model is hundreds of small kernels; on a GPU its time is mostly Python and launch
overhead unless the step is captured once and replayed, as serving stacks and mamba_ssm's own generation
benchmark do. ``GraphedDecode`` is the timed call of a decode point on CUDA. Every decode call of a point is
the step at context L (run/workloads.py), so one step is captured with its token and its position in static
device buffers, through ``SeqModel.step_at`` (caches updated in place, nothing read back to the host). The
first call warms the step up on a side stream (lazy initialisation, Triton autotuning) and captures it, so
the capture lands in ``first_call_s``; every call then replays the graph: one launch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqbench.models.base import ModelCache, SeqModel

WARMUP_STEPS = 2  # eager steps on a side stream before capture


def preflight_graphs(exp, device: torch.device) -> None:
    """``measure.cuda_graph: on`` demands CUDA: refuse it before the sweep rather than ignore it."""
    if exp.measure.cuda_graph == "on" and device.type != "cuda":
        raise RuntimeError(f"measure.cuda_graph: on needs a CUDA device, but the device is '{device}'; "
                           f"use auto (graphs on CUDA only) or off")


class GraphedDecode:
    def __init__(self, model: SeqModel, cache: ModelCache, token: Tensor, pos: int):
        """token (b, 1) on the device: the static input of the step at position ``pos``."""
        self.model, self.cache, self.token = model, cache, token
        self.pos = torch.full((1,), pos, dtype=torch.long, device=token.device)  # static position buffer
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None  # static output buffer of the graph

    def step(self) -> Tensor:
        """The captured body: the decode step at the device-side position (run eagerly, it is an ordinary step)."""
        with torch.inference_mode():
            return self.model.step_at(self.token, self.cache, self.pos)  # (b, vocab)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step()  # recorded, not run

    def __call__(self) -> Tensor:
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits
