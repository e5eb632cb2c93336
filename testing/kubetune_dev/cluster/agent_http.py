"""The slice of the kubelet API that `kubectl logs` uses: GET /containerLogs/<ns>/<pod>/<container>.

The API server connects to the Node's InternalIP at `status.daemonEndpoints.kubeletEndpoint.Port`
over TLS without verifying the certificate (no --kubelet-certificate-authority), so a throwaway
self-signed certificate is enough. Query parameters: previous, tailLines, limitBytes, follow.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse


def self_signed_cert(folder: Path, ip: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-node-agent")])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False)
            .sign(key, hashes.SHA256()))
    crt, pem = folder / "kubelet.crt", folder / "kubelet.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    pem.chmod(0o600)
    return crt, pem


class LogServer:
    def __init__(self, agent, host: str):
        self.agent = agent
        folder = Path(tempfile.mkdtemp(prefix="kubetune-agent-tls-"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self_signed_cert(folder, host))
        self.server = ThreadingHTTPServer((host, 0), self._handler())
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="agent-logs", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        agent = self.agent

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    return self.send_error(404, "only /containerLogs/<ns>/<pod>/<container> is served")
                q = {k: v[-1] for k, v in parse_qs(url.query).items()}
                _, ns, pod, container = parts
                try:
                    text = agent.logs(ns, pod, container, previous=q.get("previous") == "true")
                except (FileNotFoundError, ValueError) as e:
                    return self.send_error(404, str(e))
                if "tailLines" in q:
                    lines = text.splitlines(keepends=True)
                    text = "".join(lines[len(lines) - int(q["tailLines"]):]) if int(q["tailLines"]) else ""
                data = text.encode()
                if "limitBytes" in q:
                    data = data[: int(q["limitBytes"])]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(data)
                if q.get("follow") == "true":
                    self._follow(ns, pod, container, len(text.encode()))

            def _follow(self, ns, pod, container, offset):
                path = agent.state_dir / "logs" / ns / pod / f"{container}.log"
                while agent.pod_running(ns, pod):
                    time.sleep(0.5)
                    with open(path, "rb") as f:
                        f.seek(offset)
                        chunk = f.read()
                    if chunk:
                        offset += len(chunk)
                        self.wfile.write(chunk)
                        self.wfile.flush()

        return Handler
