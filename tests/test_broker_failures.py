"""Silent broker failures (wrong host, port, CA, hostname) are logged and make the daemon
degraded, not restarted; a TLS client certificate connects. Real Mosquitto with TLS."""

from __future__ import annotations

import logging
import subprocess
import threading
from pathlib import Path

import pytest

from moleflow.config import load_config
from moleflow.edge.daemon import Daemon
from moleflow.edge.publisher import Publisher
from moleflow.edge.spool import AlarmSpool

from tests.daemon_helpers import (Broker, daemon_config, free_port, healthz, wait_until)

pytestmark = pytest.mark.mosquitto


def tls_files(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for the name 'localhost' (not for 127.0.0.1), a client
    certificate, and a second CA that signed none of them."""
    folder.mkdir(parents=True, exist_ok=True)

    def sh(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)
    for ca in ("ca", "other"):
        sh("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
           "-keyout", f"{ca}.key", "-out", f"{ca}.crt")
    for name, cn in (("server", "localhost"), ("client", "camera-client")):
        sh("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout",
           f"{name}.key", "-out", f"{name}.csr")
        (folder / f"{name}.ext").write_text(f"subjectAltName=DNS:{cn}\n")
        sh("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
           "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext")
    return {n: folder / n for n in ("ca.crt", "other.crt", "server.crt", "server.key",
                                    "client.crt", "client.key")}


@pytest.fixture()
def tls_broker(tmp_path):
    """Mosquitto with TLS that requires a client certificate signed by its CA."""
    import shutil
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    files = tls_files(tmp_path / "tls")
    b = Broker(tmp_path / "tls-mosquitto")
    # run as root (CI), mosquitto would switch to its own user, who cannot read pytest's
    # private temporary folders; elsewhere the option is ignored
    b.conf.write_text(f"user root\nlistener {b.port} 127.0.0.1\nallow_anonymous true\n"
                      f"cafile {files['ca.crt']}\ncertfile {files['server.crt']}\n"
                      f"keyfile {files['server.key']}\nrequire_certificate true\n")
    b.start()
    yield b, files
    b.stop()


def health_says(mport: int, words: str, timeout: float = 30.0) -> dict:
    doc: dict = {}

    def check():
        nonlocal doc
        doc = healthz(mport)  # degraded: the daemon runs (not restarted), the broker is wrong
        return doc.get("status") == "degraded" and any(words in r for r in doc["reasons"])
    wait_until(check, timeout, f"/healthz naming {words!r}; last: {doc}")
    return doc


@pytest.mark.parametrize("case", ["wrong host", "wrong port", "wrong CA", "hostname mismatch"])
def test_silent_broker_failures_are_logged_and_unhealthy(case, engine_set, tls_broker, tmp_path,
                                                         caplog):
    b, files = tls_broker
    tls = {"mqtt.tls": True, "mqtt.cert_file": str(files["client.crt"]),
           "mqtt.key_file": str(files["client.key"])}
    extra = {"wrong host": {"mqtt.host": "broker.invalid"},
             "wrong port": {"mqtt.port": free_port()},
             "wrong CA": {**tls, "mqtt.ca_file": str(files["other.crt"])},
             "hostname mismatch": {**tls, "mqtt.ca_file": str(files["ca.crt"])}}[case]
    expect = {"wrong host": "cannot connect to broker.invalid", "wrong port": "Connection refused", "wrong CA": "CERTIFICATE_VERIFY_FAILED",
              "hostname mismatch": "mismatch"}[case]
    mport = free_port()
    cfg = daemon_config(engine_set, b, tmp_path, [f"pull+tcp://127.0.0.1:{free_port()}"],
                        **{"metrics.port": mport, **extra})
    with caplog.at_level(logging.WARNING):
        daemon = Daemon(cfg)
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        try:
            doc = health_says(mport, expect)
            assert doc["status"] == "degraded" and not doc["mqtt"]["connected"], doc
            assert expect in caplog.text
        finally:
            daemon.stop()
            thread.join(30)


def test_tls_client_certificate_connects(engine_set, tls_broker, tmp_path):
    """The broker requires a client certificate: mqtt.cert_file/key_file give it; the server's
    certificate names 'localhost', so that is the host (127.0.0.1 is the mismatch case)."""
    b, files = tls_broker
    cfg = load_config(None, {"mqtt.host": "localhost", "mqtt.port": b.port, "mqtt.tls": True,
                             "mqtt.device_id": "line9", "mqtt.ca_file": str(files["ca.crt"]),
                             "mqtt.cert_file": str(files["client.crt"]),
                             "mqtt.key_file": str(files["client.key"])}).mqtt
    pub = Publisher(cfg, AlarmSpool(tmp_path / "s.sqlite"), {})
    pub.start()
    try:
        assert pub.connected.wait(15), pub.mqtt_fault.state()
    finally:
        pub.stop()
