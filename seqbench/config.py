"""The YAML experiment schema (pydantic) and ``load_experiment(path)``.

Every user mistake becomes one ``ConfigError`` whose message names the file, the key path
(``models[1].d_state``) and what is allowed; unknown keys get a did-you-mean.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator
from pydantic.functional_validators import BeforeValidator

from seqbench.messages import did_you_mean

LAYOUT_LETTERS = {"A": "attention", "M": "mamba", "D": "mamba2", "S": "s4d"}
MIXER_KINDS = ("attention", "s4d", "mamba", "mamba2")
MODEL_KINDS = (*MIXER_KINDS, "hybrid")
PROBE_TASKS = ("mqar", "extrapolation")  # the workload of a recall-probe row (seqbench/probes)


class ConfigError(ValueError):
    """A problem in the user's experiment file, already phrased for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_seq_lens(value: Any) -> list[int]:
    """``[256, 512]`` or ``"256..8192 x2"`` (geometric) or ``"1000..4000 +1000"`` (arithmetic).

    A geometric factor may be fractional (``"2048..16384 x1.41421356"``: √2 steps); each length is
    START·FACTOR^k rounded to the nearest integer, so rounding never accumulates."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a list of integers or a range string like '256..8192 x2'")
    m = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*(?:([x+*])\s*(\d+(?:\.\d*)?))?\s*", value)
    if not m:
        raise ValueError(f"bad range '{value}': use 'START..STOP xFACTOR' (e.g. '256..8192 x2') or 'START..STOP +STEP'")
    start, stop = int(m[1]), int(m[2])
    op, k = m[3] or "x", float(m[4] or 2)
    if start <= 0 or stop < start:
        raise ValueError(f"bad range '{value}': need 0 < START <= STOP")
    if op == "+" and (k < 1 or k != int(k)):
        raise ValueError(f"bad range '{value}': the step must be a whole number >= 1")
    if op in "x*" and round(start * k) <= start:
        raise ValueError(f"bad range '{value}': the factor must make START grow (got {m[4]})")
    if op == "+":
        return list(range(start, stop + 1, int(k)))
    out, i = [], 0
    while (n := round(start * k**i)) <= stop:
        out.append(n)
        i += 1
    return list(dict.fromkeys(out))


class ModelSpec(_Strict):
    """One model of the experiment. Fields a kind does not use are ignored by that kind."""

    name: str
    kind: str
    preset: str | None = Field(None, description="named size preset (see `seqbench models`)")
    d_model: PositiveInt = 256
    n_layers: PositiveInt = 4
    vocab_size: PositiveInt = 256
    mlp_expand: float = Field(0.0, ge=0, description="SwiGLU hidden = mlp_expand * d_model; 0 = no MLP")
    impl: Literal["auto", "ref", "fast"] = "auto"
    # attention
    n_heads: PositiveInt | None = None
    n_kv_heads: PositiveInt | None = None
    rope_theta: float = Field(10000.0, gt=0)
    short_conv: int = Field(0, ge=0, description="width of a causal depthwise conv in front of attention; 0 = none")
    # state-space mixers
    d_state: PositiveInt | None = None
    d_conv: PositiveInt = 4
    expand: PositiveInt = 2
    dt_rank: Union[PositiveInt, Literal["auto"]] = "auto"
    headdim: PositiveInt = 64
    ngroups: PositiveInt = 1
    chunk_size: PositiveInt = 256
    dt_min: float = Field(0.001, gt=0, description="range of the initial step size Δ (Mamba, Mamba-2, S4D)")
    dt_max: float = Field(0.1, gt=0)
    s4d_init: Literal["lin", "inv"] = Field("lin", description="S4D-Lin or S4D-Inv initialisation of A")
    state_dtype: Literal["float32", "model"] = Field(
        "float32", description="S4D's recurrent state: float32 (stable over long decodes) or the model dtype")
    # hybrid: a pattern of letters (A attention, M mamba, D mamba2, S s4d) or kind names, tiled to n_layers
    layout: Union[str, list[str], None] = None

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        if v not in MODEL_KINDS:
            hint = did_you_mean(v, MODEL_KINDS)
            raise ValueError(f"unknown model kind '{v}'{hint}; allowed: {', '.join(MODEL_KINDS)}")
        return v

    def layer_kinds(self) -> list[str]:
        """The mixer kind of every layer."""
        if self.kind != "hybrid":
            return [self.kind] * self.n_layers
        pattern = self.layout
        if pattern is None:
            raise ValueError("a hybrid needs a 'layout', e.g. 'MMMA' (A attention, M mamba, D mamba2, S s4d)")
        if isinstance(pattern, str):
            bad = [c for c in pattern if c not in LAYOUT_LETTERS]
            if bad or not pattern:
                raise ValueError(f"layout '{pattern}' has unknown letters {bad}; allowed letters: A, M, D, S")
            kinds = [LAYOUT_LETTERS[c] for c in pattern]
        else:
            kinds = [LAYOUT_LETTERS.get(k, k) for k in pattern]
            for k in kinds:
                if k not in MIXER_KINDS:
                    raise ValueError(f"layout entry '{k}' is not a mixer kind; allowed: {', '.join(MIXER_KINDS)}")
        if self.n_layers % len(kinds):
            raise ValueError(f"layout length {len(kinds)} must divide n_layers ({self.n_layers})")
        return kinds * (self.n_layers // len(kinds))

    @model_validator(mode="after")
    def _sizes_fit(self) -> "ModelSpec":
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) must not exceed dt_max ({self.dt_max})")
        kinds = set(self.layer_kinds())
        heads = self.n_heads or max(1, self.d_model // 64)
        if "attention" in kinds:
            if self.d_model % heads:
                raise ValueError(f"n_heads ({heads}) must divide d_model ({self.d_model})")
            if (self.d_model // heads) % 2:
                raise ValueError(f"head dim d_model/n_heads = {self.d_model // heads} must be even (RoPE)")
            if self.n_kv_heads and heads % self.n_kv_heads:
                raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({heads})")
        if "mamba2" in kinds and (self.expand * self.d_model) % self.headdim:
            d_inner = self.expand * self.d_model
            raise ValueError(f"headdim ({self.headdim}) must divide d_inner = expand*d_model = {d_inner}")
        if "mamba2" in kinds and ((self.expand * self.d_model) // self.headdim) % self.ngroups:
            raise ValueError(f"ngroups ({self.ngroups}) must divide the number of mamba2 heads")
        return self


class GridSpec(_Strict):
    """A grid of the sweep: every workload × batch × length."""

    seq_lens: list[PositiveInt]
    batch: list[PositiveInt] = [1]
    workloads: list[Literal["prefill", "decode", "train"]] = ["prefill", "decode"]

    @field_validator("seq_lens", "batch", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> list[int]:
        return parse_seq_lens(v)

    @field_validator("seq_lens", "batch", "workloads")
    @classmethod
    def _non_empty_unique(cls, v: list) -> list:
        if not v:
            raise ValueError("must not be empty")
        return list(dict.fromkeys(v))


class SweepSpec(GridSpec):
    new_tokens: PositiveInt = 32
    also: list[GridSpec] = Field(default_factory=list, description="further grids with their own lengths, "
                                 "batches and workloads, e.g. decode throughput against batch at one context")

    def grids(self) -> list[GridSpec]:
        return [self, *self.also]

    def all_seq_lens(self) -> list[int]:
        return sorted({n for g in self.grids() for n in g.seq_lens})

    def max_context(self) -> int:
        """The largest decode context (the largest length when nothing decodes): the cache a run must hold."""
        return max([n for g in self.grids() if "decode" in g.workloads for n in g.seq_lens] or self.all_seq_lens())


class MeasureSpec(_Strict):
    warmup: Annotated[int, Field(ge=0)] = 2
    min_samples: PositiveInt = 10
    max_samples: PositiveInt = 1000
    min_time_s: Annotated[float, Field(ge=0)] = 0.5
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    isolation: Literal["inline", "process"] = "inline"
    memory_limit_gb: Annotated[float, Field(gt=0)] | None = None
    prefill_chunk: PositiveInt | None = Field(None, description="feed prompts in chunks of this many tokens")
    calibrate: bool = True
    remeasure: Annotated[int, Field(ge=0)] = Field(
        2, description="after the grid, measure points flagged noisy again, up to this many rounds")
    cuda_graph: Literal["auto", "on", "off"] = Field(
        "auto", description="decode on CUDA: replay one captured step (auto = on CUDA; on = CUDA required)")

    @field_validator("cuda_graph", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as booleans


Lengths = Annotated[list[PositiveInt], BeforeValidator(lambda v: parse_seq_lens(v))]  # a list or a range string


class MqarSpec(_Strict):  # multi-query associative recall: every n_pairs at every seq_len >= 4 * n_pairs
    n_pairs: Lengths
    seq_lens: Lengths

    @model_validator(mode="after")
    def _fits(self) -> "MqarSpec":
        too_many = [d for d in self.n_pairs if 4 * d > max(self.seq_lens)]
        if too_many:
            raise ValueError(f"n_pairs {too_many} need seq_len >= 4 * n_pairs; the longest is {max(self.seq_lens)}")
        return self


class ExtrapolationSpec(_Strict):
    """MQAR trained at train_len and scored at train_len and at each of test_lens."""

    n_pairs: PositiveInt = 1
    train_len: PositiveInt
    test_lens: Lengths

    @model_validator(mode="after")
    def _fits(self) -> "ExtrapolationSpec":
        if 4 * self.n_pairs > self.train_len:
            raise ValueError(f"train_len {self.train_len} is too short for {self.n_pairs} pairs (needs 4 * n_pairs)")
        return self


class MatchSpec(_Strict):
    """Resize every model to the reference model's non-embedding parameter count (see seqbench/matching.py)."""

    to: str
    tolerance: Annotated[float, Field(gt=0, lt=1)] = 0.05
    by: Literal["d_model", "n_layers"] = "d_model"


class RaySpec(_Strict):
    """Where and how densely the ray executor places points (see docs/design.md, "Cluster executors")."""

    address: str | None = Field(None, description="a Ray cluster's address; none starts a local instance")
    points_per_node: PositiveInt = Field(1, description="CPU points measured at once on one node (GPU: one per GPU)")


class SlurmSpec(_Strict):
    """The job array the slurm executor submits through submitit; None leaves a setting to the cluster."""

    cluster: Literal["slurm", "local"] = Field("slurm", description="local: run the array on this machine")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: PositiveInt = Field(60, description="wall-clock limit of one array task")
    gpus_per_task: Annotated[int, Field(ge=0)] | None = Field(None, description="default: 1 on cuda, else 0")
    cpus_per_task: PositiveInt | None = Field(None, description="default: threads")
    mem_gb: Annotated[float, Field(gt=0)] | None = None
    exclusive: bool | None = Field(None, description="a node to itself; default: yes on CPU")
    array_parallelism: PositiveInt | None = None
    array_by: Literal["series", "model"] = Field("series", description="one array task per series or per model")
    setup: list[str] = Field([], description="shell lines run before each task (module load, activate a venv)")
    additional: dict[str, Any] = Field({}, description="more sbatch options, e.g. {reservation: name}")


EXECUTOR_KINDS = ("inline", "process", "ray", "slurm")
class ProbesSpec(_Strict):
    """Recall probes trained in the run (seqbench/probes): each point trains a fresh model from the seed."""

    models: list[str] | None = Field(None, description="names of the models to probe (default: every model)")
    mqar: MqarSpec | None = None
    extrapolation: ExtrapolationSpec | None = None
    steps: PositiveInt = Field(500, description="AdamW steps per probe (the training budget)")
    batch: PositiveInt = 64
    lr: float = Field(3e-3, gt=0, description="peak learning rate of the one-cycle schedule")
    weight_decay: float = Field(0.1, ge=0)
    warmup_frac: float = Field(0.1, gt=0, lt=1, description="fraction of the steps spent raising the lr")
    eval_sequences: PositiveInt = Field(256, description="held-out sequences scored per probe length")
    seed: int | None = Field(None, description="training data and initialisation (default: the experiment seed)")
    eval_seed: int | None = Field(None, description="held-out data (default: seed + 1)")
    timeout_s: float = Field(600.0, gt=0, description="per probe point: training and scoring together")

    @model_validator(mode="after")
    def _some_task(self) -> "ProbesSpec":
        if self.mqar is None and self.extrapolation is None:
            raise ValueError("name at least one task: mqar or extrapolation")
        return self


class Experiment(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: PositiveInt | None = None
    models: list[ModelSpec]
    sweep: SweepSpec
    measure: MeasureSpec = MeasureSpec()
    match_params: MatchSpec | None = None
    probes: ProbesSpec | None = None
    output_dir: str = "results"
    executor: Literal[EXECUTOR_KINDS] | None = Field(None, description="default: measure.isolation")
    ray: RaySpec = RaySpec()
    slurm: SlurmSpec = SlurmSpec()

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        if not v:
            raise ValueError("must name at least one model")
        names = [m.name for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dup)}")
        return v

    @model_validator(mode="after")
    def _probe_models(self) -> "Experiment":
        if self.probes is None:
            return self
        names = [m.name for m in self.models]
        for name in self.probes.models or []:
            if name not in names:
                raise ValueError(f"probes.models: no model named '{name}'{did_you_mean(name, names)}")
        d_max = max([*(self.probes.mqar.n_pairs if self.probes.mqar else []),
                     self.probes.extrapolation.n_pairs if self.probes.extrapolation else 0])
        for m in self.models:
            if m.name in (self.probes.models or names) and m.vocab_size // 2 - 1 < d_max:
                raise ValueError(f"probes: model '{m.name}' has vocab_size {m.vocab_size}, too few keys for "
                                 f"{d_max} pairs (keys and values take half the vocabulary each; key 0 is filler)")
        return self


# ---- error formatting ---------------------------------------------------------------------------------


def key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "literal[", "union[")) and part not in ("int", "str", "list[str]"):
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the schema object that owns the key at ``loc``."""
    model: type[BaseModel] = Experiment
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        ann = model.model_fields.get(str(part))
        if ann is None:
            break
        target = ann.annotation
        for candidate in (ModelSpec, SweepSpec, GridSpec, MeasureSpec, MatchSpec, RaySpec, SlurmSpec, ProbesSpec,
                          MqarSpec, ExtrapolationSpec):
            if target is candidate or candidate in getattr(target, "__args__", ()):
                model = candidate
    return list(model.model_fields)


def _format_error(err: dict) -> str:
    loc = tuple(err["loc"])
    path = key_path(loc)
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        allowed = _fields_at(loc)
        return f"{path}: unknown key '{key}'{did_you_mean(key, allowed)}; allowed keys: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("value_error",):
        msg += f" (got {err['input']!r})"
    return f"{path}: {msg}"


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML document at ``path``; ConfigError for a missing file or invalid YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save the file as UTF-8") from None
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None


def validation_message(e: ValidationError, source: str) -> str:
    """One message for every problem pydantic found, each naming its key path."""
    lines = [_format_error(err) for err in e.errors()]
    return f"{source}: " + ("\n  ".join([""] + lines) if len(lines) > 1 else lines[0])
