"""The real distribution registry (Debian `docker-registry`) for the end-to-end test, and pushes through its API.

`Registry` runs `docker-registry serve` on 127.0.0.1 (plain HTTP, storage in a temp dir, a generated config.yml),
stopped by its pid. `push_image` pushes a Wasm module as an OCI image through the registry HTTP API v2 (the
distribution spec's "push": blob upload POST then PUT with the digest, config blob, manifest PUT with its media
type), in one of the formats the Istio agent's `pkg/wasm/imagefetcher.go` reads (plus the single-layer artifact
that Istio rejects and wasm-to-oci / ORAS users push).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import tarfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import harness as h

# Media types (OCI image-spec `media-types.md`, Docker `manifest-v2-2.md`, Istio `pkg/wasm/imagefetcher.go`).
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"

# What the e2e pushes: name → how.
#   artifact: OCI manifest, wasm config, one layer that is the module itself (wasm-to-oci / ORAS single layer);
#   docker:   Docker v2 manifest, image config, last layer a tar.gz holding plugin.wasm (Istio's "Docker compat");
#   oci:      OCI manifest, image config, last layer a tar+gzip holding plugin.wasm (Istio's "OCI compat").
FORMATS = ["artifact", "docker", "oci"]

MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST])
MAX_BODY = 64 << 20  # every read from the registry is bounded


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Pushed:
    """One image in the registry: `ref` is `repo:tag`; `manifest_digest` is `sha256:<hex>`; `layer` the digest of
    the blob that holds the module (the module itself or its tar.gz)."""

    repo: str
    tag: str
    manifest_digest: str
    manifest: bytes
    media_type: str
    layer: str

    @property
    def manifest_hex(self) -> str:
        return self.manifest_digest.removeprefix("sha256:")


class Registry:
    """`docker-registry serve config.yml` on 127.0.0.1:<free port>, plain HTTP, storage under workdir."""

    def __init__(self, workdir: Path, binary: str | None = None, start_timeout: float = 20.0):
        self.workdir = workdir
        self.binary = binary or os.environ.get("REGISTRY_BIN") or shutil.which("docker-registry") \
            or "/usr/bin/docker-registry"
        self.storage = workdir / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "config.yml"
        self.proc: h.Proc | None = None
        self.port = 0
        # The port is picked free then bound by the registry: another process may take it in between, so a
        # start that loses that race is tried again on another port (bounded).
        for attempt in range(3):
            self.port = free_port()
            self.config_path.write_text(self._config())
            self.log_path = workdir / f"registry-{attempt}.log"
            self.proc = h.Proc("registry", [self.binary, "serve", str(self.config_path)], self.log_path)
            try:
                self._wait_ready(start_timeout)
                return
            except RuntimeError:
                self.proc.stop()
                if "address already in use" not in self.proc.log_tail(20):
                    raise
        raise RuntimeError(f"registry could not bind a free port: {self.proc.log_tail()}")

    @property
    def host(self) -> str:
        """The registry as written in an oci:// URL."""
        return f"127.0.0.1:{self.port}"

    def _config(self) -> str:
        # The access log (on stdout, into the log file) lets a test count the requests the library made.
        return "\n".join([
            "version: 0.1",
            "log:",
            "  level: warn",
            "  formatter: text",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {self.host}",
            f"  secret: {os.urandom(16).hex()}",
            "",
        ])

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"registry exited with {self.proc.popen.returncode}: {self.proc.log_tail()}")
            try:
                r = self.request("GET", "/v2/", timeout=2)
                if r.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"registry not answering /v2/ within {timeout}s: {self.proc.log_tail()}")

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    # -- the registry HTTP API ------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 10.0) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read(MAX_BODY + 1)
            if len(data) > MAX_BODY:
                raise RuntimeError(f"{method} {path}: body larger than {MAX_BODY} bytes")
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
        finally:
            conn.close()

    def push_blob(self, repo: str, data: bytes) -> str:
        """Monolithic upload: POST /v2/<repo>/blobs/uploads/ → 202 + Location; PUT <Location>&digest=… → 201."""
        digest = sha256_digest(data)
        r = self.request("POST", f"/v2/{repo}/blobs/uploads/", b"", {"content-length": "0"})
        assert r.status == 202, (repo, r.status, r.body)
        location = urllib.parse.urlsplit(urllib.parse.urljoin(f"http://{self.host}/", r.headers["location"]))
        assert (location.hostname, location.port) in ((None, None), ("127.0.0.1", self.port)), location
        query = "&".join(q for q in (location.query, "digest=" + urllib.parse.quote(digest)) if q)
        r = self.request("PUT", f"{location.path}?{query}", data,
                         {"content-type": "application/octet-stream", "content-length": str(len(data))})
        assert r.status == 201, (repo, r.status, r.body)
        assert r.headers.get("docker-content-digest") == digest, r.headers
        return digest

    def push_manifest(self, repo: str, reference: str, manifest: bytes, media_type: str) -> str:
        r = self.request("PUT", f"/v2/{repo}/manifests/{reference}", manifest,
                         {"content-type": media_type, "content-length": str(len(manifest))})
        assert r.status == 201, (repo, reference, r.status, r.body)
        digest = sha256_digest(manifest)
        assert r.headers.get("docker-content-digest") == digest, r.headers
        return digest

    def get_manifest(self, repo: str, reference: str) -> Response:
        return self.request("GET", f"/v2/{repo}/manifests/{reference}", headers={"accept": MANIFEST_ACCEPT})

    def get_blob(self, repo: str, digest: str) -> Response:
        return self.request("GET", f"/v2/{repo}/blobs/{digest}")

    def push_image(self, repo: str, tag: str, module: bytes, fmt: str) -> Pushed:
        """Push module as repo:tag in format fmt (see FORMATS); returns what was pushed."""
        if fmt == "artifact":
            config = b"{}"
            layer = module
            media_type, config_type, layer_type = OCI_MANIFEST, WASM_CONFIG, WASM_LAYER
        elif fmt in ("docker", "oci"):
            tar = plugin_tar(module)
            layer = gzip.compress(tar, mtime=0)
            config = json.dumps({
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar)]},
            }).encode()
            if fmt == "docker":
                media_type, config_type, layer_type = DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_TAR_GZIP
            else:
                media_type, config_type, layer_type = OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_TAR_GZIP
        else:
            raise ValueError(fmt)
        config_digest = self.push_blob(repo, config)
        layer_digest = self.push_blob(repo, layer)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": layer_type, "digest": layer_digest, "size": len(layer)}],
        }, indent=1).encode()
        digest = self.push_manifest(repo, tag, manifest, media_type)
        return Pushed(repo, tag, digest, manifest, media_type, layer_digest)

    # -- the access log ---------------------------------------------------------------------------------------

    def requests(self, repo: str) -> list[str]:
        """The requests logged for repo, as "METHOD /path STATUS" without the query (the access log is in the Apache
        combined format)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = re.search(r'"([A-Z]+) (/v2/[^ ?]*)[^ ]* HTTP/[0-9.]+" (\d+)', line)
            if m and m.group(2).startswith(f"/v2/{repo}/"):
                out.append(f"{m.group(1)} {m.group(2)} {m.group(3)}")
        return out

    def blob_gets(self, repo: str, digest: str) -> list[str]:
        return [r for r in self.requests(repo) if r.startswith(f"GET /v2/{repo}/blobs/{digest} ")]

    def manifest_requests(self, repo: str) -> list[str]:
        return [r for r in self.requests(repo) if f"/v2/{repo}/manifests/" in r]


def plugin_tar(module: bytes) -> bytes:
    """A tar holding plugin.wasm, as `FROM scratch` + `ADD plugin.wasm ./` builds it (Istio's docs)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(module)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(module))
    return buf.getvalue()
