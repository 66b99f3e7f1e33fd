import json
import os
from pathlib import Path

import pytest
import torch
import yaml

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def write_config(tmp_path):
    """Write YAML text to a file in tmp_path and return its path."""

    def _write(text: str, name: str = "exp.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write



def latest_rows(run: Path) -> dict:
    """The row of each point of a run folder: re-measured points are appended again, the later line wins."""
    rows = [json.loads(line) for line in (run / "points.jsonl").read_text().splitlines()]
    return {(r["model"], r["workload"], r["batch"], r["seq_len"]): r for r in rows}


def run_smoke_through(executor: str, tmp_path: Path, **changes) -> tuple[Path, Path, object]:
    """configs/smoke.yaml with re-measuring off and ``changes`` on top, run by ``seqbench run --executor``.
    Returns the config written, the run folder and the CLI result."""
    from typer.testing import CliRunner

    from seqbench.cli import app

    raw = yaml.safe_load((Path(ROOT) / "configs" / "smoke.yaml").read_text())
    raw.update(changes)
    raw["measure"]["remeasure"] = 0  # the executor's grid and statuses are the point; re-measuring adds time
    config = tmp_path / f"smoke-{executor}.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(out), "--executor", executor])
    runs = [p for p in out.iterdir() if p.is_dir()] if out.exists() else []
    return config, (runs[0] if len(runs) == 1 else None), result
