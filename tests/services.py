"""A team's services on this machine, for the tests: each on 127.0.0.1 at a free port, started by a
context manager and stopped when it exits. A PostgreSQL cluster of its own (initdb in a temporary
directory), an S3 endpoint (moto's server), an MLflow tracking server on PostgreSQL with its
artifacts in S3, a Prefect server on PostgreSQL."""

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import BIN

BUCKET = "bayeskd"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}  # moto takes any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict, cwd: Path, log: Path, user: str | None = None) -> subprocess.Popen:
    """A process in a session of its own (so that stop() ends its children too), output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, user=user)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"{proc.args[0]} exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{proc.args[0]} did not come up:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def answers(url: str) -> bool:
    """Whether an HTTP server answers at `url` (an error status counts: it is up)."""
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@dataclass
class Server:
    name: str
    args: list[str]
    env: dict
    url: str
    health: str = ""  # the path that answers once it is up


@contextlib.contextmanager
def running(logs: Path, *servers: Server) -> Iterator[list[str]]:
    """The servers, started together (each logs to logs/<name>.log); their URLs once each answers;
    all stopped afterwards."""
    with contextlib.ExitStack() as stack:
        started = []
        for server in servers:
            log = logs / f"{server.name}.log"
            proc = start(server.args, server.env, logs, log)
            stack.callback(stop, proc)
            started.append((server, proc, log))
        for server, proc, log in started:
            wait_until(lambda s=server: answers(s.url + s.health), proc, log)
        yield [server.url for server in servers]


def _pg_bin(name: str) -> str:
    """A PostgreSQL program: Debian keeps the server's out of PATH, in /usr/lib/postgresql/<v>/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    path = found[-1] if found else shutil.which(name)
    assert path, f"PostgreSQL's {name} not found: `make test` installs it (Debian's postgresql)"
    return path


@contextlib.contextmanager
def postgres(databases: tuple[str, ...], logs: Path) -> Iterator[str]:
    """A PostgreSQL cluster of its own with `databases`; yields its address postgresql://USER@HOST:PORT.
    PostgreSQL refuses to run as root, so as root it runs as the `postgres` user, in a directory
    that user owns (pytest's are root's alone)."""
    user = "postgres" if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="bayeskd-pg-"))
    try:
        if user:
            shutil.chown(base, user)
        subprocess.run([_pg_bin("initdb"), "-D", str(base / "data"), "-U", "bayeskd", "--auth=trust",
                        "-E", "UTF8", "--locale=C", "--no-sync"], cwd=base, user=user, check=True,
                       capture_output=True)
        port = free_port()
        log = logs / "postgres.log"
        proc = start([_pg_bin("postgres"), "-D", str(base / "data"), "-h", "127.0.0.1", "-p", str(port),
                      "-k", str(base), "-c", "fsync=off", "-c", "synchronous_commit=off",
                      "-c", "full_page_writes=off"], os.environ.copy(), base, log, user=user)
        try:
            ready = [_pg_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "bayeskd",
                     "-d", "postgres"]
            wait_until(lambda: subprocess.run(ready).returncode == 0, proc, log, timeout=60)
            for db in databases:
                subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "bayeskd", db],
                               check=True, capture_output=True)
            yield f"postgresql://bayeskd@127.0.0.1:{port}"
        finally:
            stop(proc, signal.SIGINT)  # PostgreSQL's fast shutdown
    finally:
        shutil.rmtree(base, ignore_errors=True)


def s3_client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                        region_name=S3_KEYS["AWS_DEFAULT_REGION"])


@contextlib.contextmanager
def s3(logs: Path) -> Iterator[str]:
    """An S3 API endpoint (moto's server, in memory) with bucket BUCKET; yields its URL."""
    port = free_port()
    server = Server("s3", [f"{BIN}/moto_server", "-H", "127.0.0.1", "-p", str(port)], os.environ | S3_KEYS,
                    f"http://127.0.0.1:{port}")
    with running(logs, server) as (url,):
        s3_client(url).create_bucket(Bucket=BUCKET)
        yield url


def mlflow_server(database: str, s3_url: str) -> Server:
    """MLflow's tracking server: runs in PostgreSQL `database`, artifacts in s3://BUCKET/mlflow,
    served through it (clients need no S3 credentials)."""
    port = free_port()
    args = [f"{BIN}/mlflow", "server", "--backend-store-uri", database,
            "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    env = os.environ | S3_KEYS | {
        "MLFLOW_S3_ENDPOINT_URL": s3_url,
        # no runner of GenAI evaluation jobs: eight processes that training runs do not use
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return Server("mlflow", args, env, f"http://127.0.0.1:{port}", "/health")


def prefect_server(database: str, home: Path) -> Server:
    """Prefect's server on PostgreSQL `database`; its URL is the API's."""
    port = free_port()
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "PREFECT_API_DATABASE_CONNECTION_URL": database.replace("postgresql://",
                                                                                "postgresql+asyncpg://")}
    args = [f"{BIN}/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return Server("prefect", args, env, f"http://127.0.0.1:{port}/api", "/health")
