"""Every input to ``seqbench validate`` ends in exit 0 or 2 with one message, never a traceback: a file that is
not UTF-8, random YAML documents and random mutations of the shipped configs (hypothesis)."""

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from seqbench.cli import app

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
SHIPPED = [yaml.safe_load(p.read_text()) for p in CONFIGS]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-2, 5)), inner, max_size=4),
), max_leaves=12)


def _validate(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    result = CliRunner().invoke(app, ["validate", str(path)])
    output = result.output
    assert result.exit_code in (0, 2), f"exit {result.exit_code}: {result.exception!r}\n{output}"
    assert "Traceback" not in output
    if result.exit_code == 0:
        assert output.startswith("ok:") and "error" not in output
    else:
        assert output.startswith("error:") and output.count("error:") == 1, output


def test_a_file_that_is_not_utf8_exits_2_with_one_message(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\n".encode("latin-1"))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "not UTF-8 text (byte 0xe9 at offset 9)" in " ".join(result.output.split())
    _validate(path, path.read_bytes())


def _paths(doc, prefix=()):
    """Every key path inside a parsed document (dict keys and list indices)."""
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


def _mutate(doc, path, op, value):
    if not path:
        return value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "add" and isinstance(parent, dict):
        parent[f"{last}_x"] = value
    else:
        parent[last] = value
    return doc


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_random_documents_and_mutated_configs_end_in_one_message(tmp_path, data):
    source = data.draw(st.sampled_from(["yaml", "text", "bytes", "mutation", "mutation"]))
    if source == "yaml":
        content = yaml.safe_dump(data.draw(values)).encode()
    elif source == "text":
        content = data.draw(st.text(max_size=200)).encode()
    elif source == "bytes":
        content = data.draw(st.binary(max_size=200))
    else:
        doc = yaml.safe_load(yaml.safe_dump(data.draw(st.sampled_from(SHIPPED))))  # a fresh copy
        for _ in range(data.draw(st.integers(1, 3))):
            path = data.draw(st.sampled_from(list(_paths(doc))))
            op = data.draw(st.sampled_from(["replace", "delete", "add"])) if path else "replace"
            doc = _mutate(doc, path, op, data.draw(values))
        content = yaml.safe_dump(doc).encode()
    _validate(tmp_path / "exp.yaml", content)
