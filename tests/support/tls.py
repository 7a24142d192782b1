"""Test certificates: a CA and one certificate that every process uses, server and client."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path


def make_certs(directory: Path, ips: Sequence[str] = ("127.0.0.1",)) -> dict[str, str]:
    """A CA and one certificate (for these IPs) that every process uses, server and client."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=serve-test-ca",
    )
    (directory / "san.cnf").write_text(
        "subjectAltName="
        + ",".join([*(f"IP:{ip}" for ip in ips), "DNS:localhost"])
        + "\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "node.key",
        "-out",
        "node.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "node.pem",
        "-days",
        "1",
        "-extfile",
        "san.cnf",
    )
    return {
        "SERVE_TLS_CERT": str(directory / "node.pem"),
        "SERVE_TLS_KEY": str(directory / "node.key"),
        "SERVE_TLS_CA": str(directory / "ca.pem"),
    }
