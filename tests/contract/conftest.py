"""Fixtures of the contract tests (see libraries.py): the libraries are imported once for this folder with
their extension modules stubbed, and forgotten again when it is done."""

from __future__ import annotations

import pytest

from contract.libraries import forget_libraries, import_with_stubbed_extensions, require_libraries, route


@pytest.fixture(scope="package")
def _stubbed_libraries():
    require_libraries()
    import_with_stubbed_extensions()
    yield
    forget_libraries()


@pytest.fixture
def libs(_stubbed_libraries, monkeypatch):
    return route(monkeypatch)
