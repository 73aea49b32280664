"""The systemd unit: systemd-analyze accepts it, and the daemon speaks the notify protocol."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moleflow.edge.daemon import sd_notify

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "moleflow.service"


def test_unit_has_what_operations_rely_on():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "User=moleflow", "Restart=on-failure",
                 "--validate-config", "EnvironmentFile=-/etc/moleflow/moleflow.env",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "ExecReload=/bin/kill -HUP",
                 "StateDirectory=moleflow"):
        assert line in text, line


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    moleflow = Path(sys.executable).with_name("moleflow")
    if not moleflow.exists():
        pytest.skip("the moleflow console script is not installed in this environment")
    unit = tmp_path / "moleflow.service"  # the same unit, pointing at this checkout's venv
    unit.write_text(UNIT.read_text().replace("/opt/moleflow/.venv/bin/moleflow", str(moleflow)))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "moleflow.service" not in res.stderr, res.stderr  # no warning about our unit


def test_sd_notify_reaches_the_notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1")
        assert server.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("WATCHDOG=1")  # outside systemd: a no-op
