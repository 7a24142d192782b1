"""HTTPS at the proxy: give http_options a key and a certificate (PEM files), as Ray's
``HTTPOptions(ssl_keyfile=..., ssl_certfile=...)``. Run it: ``python examples/https.py``.

The example makes a throwaway CA and server certificate with openssl; use your own in practice.
A password-protected key takes ``ssl_keyfile_password`` (it travels to the proxy in its
environment, never on a command line).
"""

import os
import ssl
import subprocess
import tempfile
from pathlib import Path

import httpx
from starlette.requests import Request

import serve


@serve.deployment
class Hello:
    def __call__(self, request: Request) -> str:
        return f"Hello over {request.url.scheme}!"


def make_certificate(directory: Path) -> tuple[str, str, str]:
    """A CA, and a certificate it signs for 127.0.0.1 (key, certificate, CA)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "1", "-subj", "/CN=example-ca")  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=127.0.0.1")  # fmt: skip
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "1",
            "-extfile", "san.cnf")  # fmt: skip
    return str(directory / "server.key"), str(directory / "server.pem"), str(directory / "ca.pem")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        key, cert, ca = make_certificate(Path(tmp))
        serve.start(
            http_options={
                "port": int(os.environ.get("SERVE_DEFAULT_HTTP_PORT", "8000")),
                "ssl_keyfile": key,
                "ssl_certfile": cert,
            }
        )
        serve.run(Hello.bind(), name="hello")
        address = next(iter(serve.status().proxy_details.values())).http_address
        trust = ssl.create_default_context(cafile=ca)
        print(httpx.get(f"https://{address}/", verify=trust).text)
        serve.shutdown()
