"""TLS for the page server and its clients: contexts built from the files given on the command
line. The server presents a certificate and key; the destination trusts exactly one CA file
(no system roots) and checks the host name, so a page server with another CA is refused."""
from __future__ import annotations

import ssl


class TlsError(Exception):
    """A certificate, key or CA file could not be loaded; the message names the file."""


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"cannot load TLS certificate {cert_file} with key {key_file}: {e}") from None
    return context


def client_context(ca_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"cannot load TLS CA certificate {ca_file}: {e}") from None
    return context
