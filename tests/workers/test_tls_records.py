"""TlsConnection's record I/O (data_plane/workers/tls.py) against a real OpenSSL client over memory BIOs:
whatever way the client's records arrive — several in one read, one split over reads, a record of the
largest size, close_notify behind data — every byte of plaintext comes out of one `read`, in order."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from data_plane.workers.tls import ServerTls, TlsConnection


def _identity() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "records.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("records.test")]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


@pytest.fixture(scope="module")
def server() -> ServerTls:
    return ServerTls([_identity()], None)


def _connected(server: ServerTls) -> tuple[TlsConnection, SSL.Connection]:
    conn = server.connection()
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except SSL.WantReadError:
            conn.receive(client.bio_read(65536))
            conn.do_handshake()
            client.bio_write(conn.outgoing())
    else:
        raise AssertionError("the handshake did not complete")
    conn.receive(client.bio_read(65536))  # the client's Finished
    assert conn.do_handshake() and conn.read() == b""
    return conn, client


def _records(client: SSL.Connection, *plaintexts: bytes) -> bytes:
    out = b""
    for text in plaintexts:
        client.sendall(text)
        out += client.bio_read(1 << 20)
    return out


def test_several_records_in_one_read_all_come_out(server: ServerTls) -> None:
    conn, client = _connected(server)
    conn.receive(_records(client, b"GET /1 HTTP/1.1\r\n\r\n", b"GET /2 HTTP/1.1\r\n\r\n", b"GET /3"))
    assert conn.read() == b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3"
    assert conn.read() == b""


def test_full_size_records_and_a_short_one_come_out_whole(server: ServerTls) -> None:
    conn, client = _connected(server)
    body = bytes(range(256)) * 160  # 40,960 bytes: two records of 16 KiB, then a short one
    conn.receive(_records(client, body))
    assert conn.read() == body


def test_a_record_split_over_reads_comes_out_when_complete(server: ServerTls) -> None:
    conn, client = _connected(server)
    data = _records(client, b"one", b"two")
    conn.receive(data[:7])
    assert conn.read() == b""
    conn.receive(data[7:])
    assert conn.read() == b"onetwo"


def test_close_notify_behind_data_gives_the_data_and_the_close(server: ServerTls) -> None:
    conn, client = _connected(server)
    data = _records(client, b"last words")
    client.shutdown()
    conn.receive(data + client.bio_read(65536))
    assert conn.read() == b"last words" and conn.closed_by_peer
