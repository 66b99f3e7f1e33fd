"""Recall probes as grid points of a run: the probe grid and ``run_probe(spec) -> row``.

A probe point is (model, task, batch, seq_len, n_pairs). It builds a fresh model from the seed, trains it
(seqbench/probes/train.py) on sequences drawn from ``probes.seed`` and scores it on ``eval_sequences``
held-out sequences drawn from ``probes.eval_seed``. Tasks:

- ``mqar``: trained and scored at ``seq_len``.
- ``extrapolation``: trained at ``seq_len`` = ``train_len``, scored there and at every ``test_lens`` length;
  ``accuracy_by_len`` holds them all as a JSON object ``{"length": accuracy}``.

``cache_bytes`` is what the model allocates to decode one sequence of ``seq_len`` tokens, from the same
``allocate_cache`` as the cost workloads, on the meta device (no memory).
"""

from __future__ import annotations

import json

import torch

from seqbench.config import Experiment
from seqbench.models import DTYPES, build_model
from seqbench.probes.mqar import mqar_batch
from seqbench.probes.train import accuracy, train

Key = tuple[str, str, int, int, int]  # (model, task, batch, seq_len, n_pairs)


def probe_grid(exp: Experiment) -> list[Key]:
    """Every probe point, shortest first; within a length and n_pairs the models alternate direction."""
    p = exp.probes
    if p is None:
        return []
    names = p.models or [m.name for m in exp.models]
    cells: list[tuple[str, int, int]] = []  # (task, seq_len, n_pairs)
    if p.mqar is not None:
        cells += [("mqar", length, d) for length in p.mqar.seq_lens for d in p.mqar.n_pairs if 4 * d <= length]
    if p.extrapolation is not None:
        cells.append(("extrapolation", p.extrapolation.train_len, p.extrapolation.n_pairs))
    grid: list[Key] = []
    for i, (task, length, d) in enumerate(cells):
        order = names if i % 2 == 0 else names[::-1]
        grid.extend((name, task, p.batch, length, d) for name in order)
    return grid


def run_probe(spec, deadline: float) -> dict:
    """Train and score one probe point (a seqbench.run.point.PointSpec): the measured columns of its row.
    Raises on failure; run_point turns that into a row with a status."""
    exp, p = spec.exp, spec.exp.probes
    seed = exp.seed if p.seed is None else p.seed
    eval_seed = seed + 1 if p.eval_seed is None else p.eval_seed
    torch.manual_seed(seed)  # the initialisation; a fresh model at every point, whatever ran before
    model = build_model(spec.model_spec, device=spec.device, dtype=DTYPES[exp.dtype])
    vocab = model.vocab_size
    d = spec.n_pairs
    gen = torch.Generator().manual_seed(seed)

    def next_batch(n: int):
        return mqar_batch(n, spec.seq_len, d, vocab, gen)

    result = train(model, next_batch, p.steps, spec.batch, p.lr, p.weight_decay, p.warmup_frac, deadline)
    lengths = [spec.seq_len]
    if spec.workload == "extrapolation":
        lengths += [n for n in exp.probes.extrapolation.test_lens if n != spec.seq_len]
    scores = {}
    for length in lengths:
        tokens, labels = mqar_batch(p.eval_sequences, length, d, vocab, torch.Generator().manual_seed(eval_seed))
        scores[length] = accuracy(model, tokens, labels)
    by_len = json.dumps({str(k): v for k, v in scores.items()}) if spec.workload == "extrapolation" else None
    return dict(
        impl_used=model.impl_used(),
        accuracy=scores[spec.seq_len],
        accuracy_by_len=by_len,
        train_steps=result.steps,
        train_s=result.seconds,
        final_loss=result.final_loss,
        cache_bytes=model.allocate_cache(1, spec.seq_len, device="meta").nbytes(),
        param_count=model.num_params(),
        param_count_non_embedding=model.num_params(non_embedding=True),
        param_bytes=model.param_bytes(),
    )
