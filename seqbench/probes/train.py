"""Train a fresh model on a recall probe and score it: AdamW with a one-cycle schedule, loss on the query
positions only, accuracy = exact argmax match at the query positions of held-out sequences."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from seqbench.models.base import SeqModel
from seqbench.probes.mqar import IGNORE

Batch = Callable[[int], tuple[Tensor, Tensor]]  # n -> (tokens, labels), each (n, l)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float


def train(model: SeqModel, next_batch: Batch, steps: int, batch: int, lr: float, weight_decay: float,
          pct_start: float = 0.1, deadline: float | None = None) -> TrainResult:
    """``steps`` (>= 1) AdamW steps on ``next_batch(batch)``; raises TimeoutError once ``deadline`` passes
    (the run's alarm normally stops it first; this check covers a run outside the main thread)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    t0 = time.monotonic()
    for _ in range(steps):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("training exceeded the probe's time budget")
        tokens, labels = next_batch(batch)
        logits = model(tokens)  # (b, l, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return TrainResult(steps, time.monotonic() - t0, loss.item())


@torch.no_grad()
def accuracy(model: SeqModel, tokens: Tensor, labels: Tensor, batch: int = 64) -> float:
    """Fraction of query positions (labels != IGNORE) whose argmax prediction equals the label."""
    model.eval()
    hits = total = 0
    for s in range(0, tokens.shape[0], batch):
        t, y = tokens[s : s + batch], labels[s : s + batch]
        pred = model(t).argmax(-1)  # (b, l)
        mask = y != IGNORE
        hits += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
    return hits / total
