"""The local blob-store servers as pytest fixtures, one per test module that asks for them: ``moto`` (S3),
``gcs_server`` (the GCS emulator) and ``azurite`` (Azure). Each is started on a free port on 127.0.0.1 and stopped
by its own process (see :mod:`tests.support.servers`). A module that wants one server for the whole session
defines its own fixture of the same name (test_blob_*.py do)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import servers


@pytest.fixture(scope="module")
def moto() -> Iterator[servers.Server]:
    server = servers.start_moto()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[servers.Server]:
    server = servers.start_gcs()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def azurite() -> Iterator[servers.Server]:
    server = servers.start_azurite()
    try:
        yield server
    finally:
        server.stop()
