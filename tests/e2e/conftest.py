"""Fixtures of the wasm-ecds end-to-end test (see run.sh for how it is driven)."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402


def _sigterm(signum, frame):
    # run.sh bounds the whole run with `timeout`: turn its SIGTERM into an interrupt so that fixture teardown
    # still stops every process the test started.
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _sigterm)

# Every server is on 127.0.0.1: never send those requests (the library's fetches, admin calls) to a proxy.
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(x for x in ("127.0.0.1", "localhost", os.environ.get(_var)) if x)


def modules_dir() -> Path:
    return Path(os.environ.get("E2E_MODULES_DIR", h.REPO / "tests/fixtures/basic-auth/target/e2e"))


@pytest.fixture(scope="session")
def wasm_modules() -> dict[str, bytes]:
    """The basic-auth module built twice by run.sh: variant v1 and variant v2."""
    out = {}
    for variant in ("v1", "v2"):
        path = modules_dir() / f"basic-auth-{variant}.wasm"
        if not path.is_file():
            pytest.fail(f"{path} missing: build the fixture with tests/e2e/run.sh")
        data = path.read_bytes()
        assert data[:4] == b"\0asm", path
        out[variant] = data
    assert out["v1"] != out["v2"]
    return out


@pytest.fixture(scope="session")
def wasm_ecds():
    """The library's Python binding, loading libwasm_ecds.so from WASM_ECDS_LIBRARY or WASM_ECDS_LIB_DIR."""
    if not os.environ.get("WASM_ECDS_LIBRARY"):
        lib_dir = Path(os.environ.get("WASM_ECDS_LIB_DIR", h.REPO / "target/release"))
        os.environ["WASM_ECDS_LIBRARY"] = str(lib_dir / "libwasm_ecds.so")
    if not Path(os.environ["WASM_ECDS_LIBRARY"]).is_file():
        pytest.fail(f"{os.environ['WASM_ECDS_LIBRARY']} missing: cargo build --release first")
    binding = h.REPO / "bindings/python/src"
    if str(binding) not in sys.path:
        sys.path.insert(0, str(binding))
    try:
        import wasm_ecds
    except ImportError as e:
        pytest.fail(f"cannot import the wasm_ecds Python binding from {binding}: {e}")
    assert Path(wasm_ecds.__file__).resolve().is_relative_to(binding.resolve()), wasm_ecds.__file__
    print(f"wasm_ecds {wasm_ecds.version()} from {wasm_ecds.__file__}, library {os.environ['WASM_ECDS_LIBRARY']}")
    return wasm_ecds


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


class Stack:
    """Loopback upstream (HTTP 200), TCP echo, a module file server, and (once started) one Envoy."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.module_root = workdir / "modules"
        self.module_root.mkdir()
        self.http_ecds = workdir / "ecds.pb"
        self.net_ecds = workdir / "ecds-net.pb"
        self.cache_dir = workdir / "wasm-cache"
        self.servers: list[h.Server] = []
        self.envoy: h.Envoy | None = None
        self.upstream = self._server("upstream")
        self.echo = self._server("echo")
        self.files = self._server("files", str(self.module_root))

    def _server(self, mode, *args):
        s = h.Server(mode, self.workdir, *args)
        self.servers.append(s)
        return s

    def publish(self, name: str, data: bytes) -> str:
        """Serve data at http://127.0.0.1:<port>/<name>; returns the URL."""
        (self.module_root / name).write_bytes(data)
        return f"http://127.0.0.1:{self.files.port}/{name}"

    def module_requests(self) -> list[str]:
        return [l for l in self.files.proc.log_path.read_text().splitlines() if l.startswith("GET ")]

    def start_envoy(self, http_bytes: bytes, net_bytes: bytes | None = None) -> h.Envoy:
        assert self.envoy is None
        h.write_ecds(self.http_ecds, http_bytes)
        if net_bytes is not None:
            h.write_ecds(self.net_ecds, net_bytes)
        self.envoy = h.Envoy(
            self.workdir,
            self.upstream.port,
            self.echo.port,
            self.http_ecds,
            self.net_ecds if net_bytes is not None else None,
        )
        self.envoy.start()
        return self.envoy

    def stop(self):
        if self.envoy:
            self.envoy.stop()
        for s in self.servers:
            s.stop()


@pytest.fixture
def stack(request, tmp_path):
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.stop()
        failed = any(getattr(request.node, "rep_" + w, None) and getattr(request.node, "rep_" + w).failed
                     for w in ("setup", "call"))
        if failed and s.envoy is not None:
            print(f"\n----- tail of {s.envoy.log_path} -----\n{s.envoy.log_tail(80)}")
            print(f"----- module server log -----\n{s.files.proc.log_tail(20)}")


@pytest.fixture(scope="session")
def registry_server(tmp_path_factory):
    """One distribution registry (Debian docker-registry) for the session; each test pushes to its own repository."""
    import registry as r

    try:
        server = r.Registry(tmp_path_factory.mktemp("registry"))
    except (OSError, RuntimeError, TimeoutError) as e:
        pytest.fail(f"cannot start the distribution registry (tests/e2e/run.sh installs docker-registry): {e}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def registry(request, registry_server):
    """The session's registry; on a failure the requests made for this test's repository are printed."""
    yield registry_server
    failed = any(getattr(request.node, "rep_" + w, None) and getattr(request.node, "rep_" + w).failed
                 for w in ("setup", "call"))
    if failed:
        repo = repo_name(request.node.name)
        print(f"\n----- registry requests for {repo} -----\n" + "\n".join(registry_server.requests(repo)[-40:]))


def repo_name(test_name: str) -> str:
    """A registry repository named after the test (the distribution spec's name grammar: [a-z0-9] separated)."""
    return "e2e/" + re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")


@pytest.fixture
def repo(request) -> str:
    return repo_name(request.node.name)
