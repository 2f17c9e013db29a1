"""A real S3 API server on 127.0.0.1 for the tests (moto's, in a process of its own:
tests/servers.py), and buckets on it. Nothing of xclay is mocked: xclay talks HTTP to it
exactly as to AWS, with credentials and endpoint from the environment, as users set them.
(In a thread of the test process it would never answer GDAL, which holds the GIL while
it waits for some reads.)"""

from __future__ import annotations

import os
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class S3Server:
    """The server's endpoint and the environment a client (or a subprocess) needs."""

    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "xclay-test",
            "AWS_SECRET_ACCESS_KEY": "xclay-test-secret",
            "AWS_REGION": "us-east-1",
        }

    def bucket(self) -> str:
        """A new, empty bucket; its name."""
        name = f"xclay-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    pytest.importorskip("moto.server", reason="needs moto[s3] and flask (xclay[dev])")
    from tests.servers import serving

    with serving("s3") as port:
        yield S3Server(f"http://127.0.0.1:{port}")


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 server, with this process's environment pointing at it (as a user's would)."""
    pytest.importorskip("obstore", reason="needs obstore (xclay[cloud])")
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SKIP_SIGNATURE"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


def subprocess_env(server: S3Server) -> dict[str, str]:
    """This process's environment plus the server's, for a command run as a subprocess."""
    return {**os.environ, **server.env}
