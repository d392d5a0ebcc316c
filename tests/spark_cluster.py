"""A Spark standalone cluster on loopback, started from the installed pyspark, for tests.

Master and one worker run as child processes (``spark-class``) on free ports of 127.0.0.1;
`standalone_cluster` yields the master URL and always stops both, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(log: Path, text: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.25)
    raise RuntimeError(f"Spark did not report {text!r} within {seconds:.0f}s; its log:\n{log.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def standalone_cluster(folder: Path, cores: int = 2, memory: str = "2g") -> Iterator[str]:
    import pyspark

    home = Path(pyspark.__file__).parent
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           "SPARK_LOG_DIR": str(folder), "SPARK_WORKER_DIR": str(folder / "work")}
    port = free_port()
    url = f"spark://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    try:
        master_log = folder / "master.log"
        procs.append(subprocess.Popen(
            ["bash", str(home / "bin" / "spark-class"), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(port), "--webui-port", str(free_port())],
            env=env, stdout=master_log.open("w"), stderr=subprocess.STDOUT))
        _wait_for(master_log, "I have been elected leader", procs[0], 90)
        worker_log = folder / "worker.log"
        procs.append(subprocess.Popen(
            ["bash", str(home / "bin" / "spark-class"), "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1",
             "--cores", str(cores), "--memory", memory, "--webui-port", str(free_port()), "--work-dir", str(folder / "work")],
            env=env, stdout=worker_log.open("w"), stderr=subprocess.STDOUT))
        _wait_for(worker_log, "Successfully registered with master", procs[1], 90)
        yield url
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextlib.contextmanager
def connect_server(folder: Path, master: str = "local[2]") -> Iterator[str]:
    """A Spark Connect server on a free port of 127.0.0.1 (``spark-submit`` of the server class
    with the ``spark-connect`` jar the pyspark wheel holds); yields its ``sc://`` URL and
    always stops it."""
    import pyspark

    home = Path(pyspark.__file__).parent
    jar = next((home / "jars").glob("spark-connect_*.jar"))
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    port = free_port()
    log = folder / "connect.log"
    proc = subprocess.Popen(
        ["bash", str(home / "bin" / "spark-submit"), "--class", "org.apache.spark.sql.connect.service.SparkConnectServer",
         "--master", master, "--jars", str(jar), "--conf", f"spark.connect.grpc.binding.port={port}",
         "--conf", "spark.connect.grpc.binding.address=127.0.0.1", "--conf", "spark.ui.enabled=false",
         "--conf", f"spark.sql.warehouse.dir={folder / 'spark-warehouse'}", "spark-internal"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=folder)
    try:
        _wait_for(log, "Spark Connect server started", proc, 120)
        yield f"sc://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
