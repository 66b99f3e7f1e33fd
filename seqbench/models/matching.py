"""Match parameter counts across architectures: resize every model to the non-embedding parameter count of a
reference model, within a tolerance, by changing one size (``d_model`` or ``n_layers``).

Comparisons at equal parameter count are the convention of the Mamba and Mamba-2 papers' scaling plots;
embedding and LM-head rows are excluded because they do not depend on the architecture.
"""

from __future__ import annotations

from pydantic import ValidationError

from seqbench.config import Experiment, ModelSpec


def _count(spec: ModelSpec) -> int:
    from seqbench.models import describe_model

    return describe_model(spec, 1)["params_non_embedding"]


def _candidates(spec: ModelSpec, by: str, limit: int) -> list[ModelSpec]:
    """Valid resized specs in increasing size (sizes that break a divisibility rule are left out)."""
    out = []
    values = range(8, limit + 1, 8) if by == "d_model" else range(1, limit + 1)
    for v in values:
        try:
            out.append(ModelSpec.model_validate({**spec.model_dump(), by: v}))
        except ValidationError:
            continue
    return out


def _closest(cands: list[ModelSpec], target: int) -> tuple[ModelSpec, int]:
    """The candidate whose count is nearest target, and its count. Counts grow with either size, so bisect;
    each count is computed once (it costs a meta-device model build)."""
    counts: dict[int, int] = {}

    def count_of(i: int) -> int:
        if i not in counts:
            counts[i] = _count(cands[i])
        return counts[i]

    lo, hi = 0, len(cands) - 1
    while lo < hi:  # the first candidate with count >= target
        mid = (lo + hi) // 2
        if count_of(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    best = min(range(max(0, lo - 1), lo + 1), key=lambda i: abs(count_of(i) - target))
    return cands[best], count_of(best)


def match_params(exp: Experiment) -> Experiment:
    """Return the experiment with every model resized to the reference's non-embedding parameter count.
    The achieved counts are on every result row and in ``seqbench run --dry-run``."""
    m = exp.match_params
    names = [s.name for s in exp.models]
    if m.to not in names:
        raise ValueError(f"match_params.to: '{m.to}' is not a model of this experiment; models: {', '.join(names)}")
    ref = exp.models[names.index(m.to)]
    target = _count(ref)
    models = []
    for spec in exp.models:
        if spec.name == ref.name:
            models.append(spec)
            continue
        limit = 4 * max(spec.d_model, ref.d_model) if m.by == "d_model" else 4 * max(spec.n_layers, ref.n_layers)
        best, count = _closest(_candidates(spec, m.by, limit), target)
        rel = count / target - 1
        if abs(rel) > m.tolerance:
            raise ValueError(f"match_params: model '{spec.name}' gets no closer than {rel:+.1%} to {target:,} "
                             f"non-embedding parameters by changing {m.by} (tolerance {m.tolerance:.0%}); "
                             f"try by: {'n_layers' if m.by == 'd_model' else 'd_model'} or a larger tolerance")
        models.append(best)
    return exp.model_copy(update={"models": models})
