"""Throwaway TLS files for a test server: a CA, a server certificate for 127.0.0.1 and a
client certificate, made with the ``openssl`` command."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all for one day."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("tls=True needs the openssl command")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = [
        [
            "req",
            "-x509",
            *key,
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=kvshelf test CA",
        ],
    ]
    for name in ("server", "client"):
        run += [
            [
                "req",
                *key,
                "-keyout",
                f"{name}.key",
                "-out",
                f"{name}.csr",
                "-subj",
                f"/CN=kvshelf test {name}",
            ],
            [
                "x509",
                "-req",
                "-in",
                f"{name}.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                f"{name}.crt",
                "-days",
                "1",
                "-extfile",
                "san.ext",
            ],
        ]
    for args in run:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)
    return {
        "ca": directory / "ca.crt",
        "cert": directory / "client.crt",
        "key": directory / "client.key",
    }
