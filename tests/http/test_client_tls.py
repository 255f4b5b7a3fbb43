"""UpstreamClient over https, and its check of where a request goes (allow_peer), asked about
the address dialed, for http and https alike."""

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from yarl import URL

from faas_gateway.http.client import UpstreamClient, UpstreamConnectError, UpstreamRefusedError
from tests.http.helpers import (
    LONG,
    OK_ANSWER,
    AppServer,
    answer_each,
    assert_client_still_works,
    echo,
    fetch,
    idle_connections,
)


def make_self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        pass
    else:
        private_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(private_key, hashes.SHA256())
        )
        cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(
            private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert, key
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the cryptography package nor the openssl command is available")
    completed = subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if completed.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {completed.stderr.decode()[-500:]}")
    return cert, key


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def https_server(certificate, serve) -> AppServer:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    return await serve(echo, ssl_context=server_context)


async def test_https_with_a_trusted_certificate(certificate, https_server, make_client):
    cert, _ = certificate
    client = make_client(ssl_context=ssl.create_default_context(cafile=str(cert)))
    assert https_server.url().scheme == "https"
    for index in range(2):
        response, body = await fetch(client, https_server.url(f"/{index}"), "POST", body=b"tls")
        assert (response.status, body) == (200, b"POST /%d tls" % index)
    assert https_server.connection_count == 1


async def test_https_with_an_untrusted_certificate(certificate, https_server, make_client):
    cert, _ = certificate
    with pytest.raises(UpstreamConnectError):
        await make_client().request("GET", https_server.url(), [], None, LONG)
    assert https_server.peers == []
    # A client that trusts the certificate gets through to the same server.
    client = make_client(ssl_context=ssl.create_default_context(cafile=str(cert)))
    _, body = await fetch(client, https_server.url("/t"))
    assert body == b"GET /t "


# --- checking where a request goes (allow_peer) ---------------------------------------------------


class Addresses:
    """An allow_peer that notes every address it is asked about and allows what it is told."""

    def __init__(self, allow: bool = True) -> None:
        self.allow = allow
        self.seen: list[str] = []

    def __call__(self, address: str) -> bool:
        self.seen.append(address)
        return self.allow


async def checked(client: UpstreamClient, url: URL, addresses: Addresses) -> bytes:
    async with await client.request("GET", url, [], None, LONG, allow_peer=addresses) as response:
        return await response.read()


async def test_allow_peer_is_asked_about_the_address_dialed_before_connecting(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    # "0" resolves to 0.0.0.0, which connects to this host: a socket connected so reports
    # 127.0.0.1 as its peer, so only the address dialed shows where the request went.
    url = URL(f"http://0:{server.port}/")
    refusing = Addresses(allow=False)
    with pytest.raises(UpstreamRefusedError, match=r"0\.0\.0\.0"):
        await checked(client, url, refusing)
    assert refusing.seen == ["0.0.0.0"]
    assert server.connections == []  # refused before connecting

    allowing = Addresses()
    assert await checked(client, url, allowing) == b"fine"
    assert await checked(client, url, allowing) == b"fine"  # kept alive, and asked again
    assert allowing.seen == ["0.0.0.0", "0.0.0.0"]
    assert len(server.connections) == 1
    with pytest.raises(UpstreamRefusedError):
        await checked(client, url, refusing)
    assert idle_connections(client) == []  # the kept-alive connection is dropped


async def test_unchecked_connections_are_not_lent_to_checked_requests(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    await assert_client_still_works(client, server.url())
    addresses = Addresses()
    assert await checked(client, server.url(), addresses) == b"fine"
    assert addresses.seen == ["127.0.0.1"]
    assert len(server.connections) == 2
    await assert_client_still_works(client, server.url())  # either pooled one will do
    assert len(server.connections) == 2


async def test_checked_https_request_connects_by_address_with_the_certificate_checked(
    certificate, https_server, make_client
):
    cert, _ = certificate
    with pytest.raises(UpstreamConnectError):
        await checked(make_client(), https_server.url(), Addresses())  # an untrusted certificate
    client = make_client(ssl_context=ssl.create_default_context(cafile=str(cert)))
    url = URL(f"https://localhost:{https_server.server.port}/tls")
    addresses = Addresses()
    assert await checked(client, url, addresses) == b"GET /tls "
    assert "127.0.0.1" in addresses.seen
