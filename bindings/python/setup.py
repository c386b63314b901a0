"""Builds the wasm-ecds wheel with libwasm_ecds inside it.

The package stays pure ctypes; what makes the wheel platform-specific is the shared library it carries,
``wasm_ecds/libwasm_ecds.so``. ``build_py`` builds that library with cargo from the crate (the repository root
in a checkout, ``pip install ./bindings/python``; the copy of the crate in ``rust/`` inside a source
distribution, ``python -m build bindings/python``) and puts a stripped copy beside the package. The wheel is
tagged ``py3-none-<platform>``: any Python 3 and no Python ABI, since the library does not link libpython.

Why not setuptools-rust or maturin: setuptools-rust names the library after the interpreter's extension suffix
and tags the wheel for one CPython (``cp311-cp311``), and maturin packages Python extensions, cffi modules or
executables, not a plain C library loaded by ctypes. What they would do here is the ``cargo build`` below.

The version is the crate's (``Cargo.toml``): the one ``wasm_ecds_version()`` reports, so the two never differ.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent.parent
# In a source distribution the crate is carried in rust/; in a checkout it is the repository root.
SDIST_CRATE = HERE / "rust"
CRATE = SDIST_CRATE if (SDIST_CRATE / "Cargo.toml").is_file() else REPOSITORY
if not (CRATE / "Cargo.toml").is_file():
    raise RuntimeError(f"no wasm-ecds crate at {CRATE}: build from the repository's bindings/python or from an sdist")

if sys.platform == "darwin":
    LIBRARY_NAME = "libwasm_ecds.dylib"
elif sys.platform == "win32":
    LIBRARY_NAME = "wasm_ecds.dll"
else:
    LIBRARY_NAME = "libwasm_ecds.so"


def crate_version() -> str:
    manifest = (CRATE / "Cargo.toml").read_text(encoding="utf-8")
    package = re.search(r"^\[package\]$(.*?)(?=^\[)", manifest + "\n[", re.M | re.S)
    version = package and re.search(r'^version\s*=\s*"([^"]+)"', package.group(1), re.M)
    if not version:
        raise RuntimeError(f"no [package] version in {CRATE / 'Cargo.toml'}")
    return version.group(1)


def cargo() -> str:
    found = os.environ.get("CARGO") or shutil.which("cargo")
    if not found:
        raise RuntimeError(
            "building the wasm-ecds wheel needs Rust's cargo (https://rustup.rs) to build libwasm_ecds; "
            "a built wheel needs neither"
        )
    return found


def build_library() -> Path:
    """Builds libwasm_ecds with cargo (release) and returns the path of the shared library."""
    command = [cargo(), "build", "--release", "--lib", "--locked", "--manifest-path", str(CRATE / "Cargo.toml"),
               "--message-format=json-render-diagnostics"]
    print("building libwasm_ecds:", " ".join(command), flush=True)
    proc = subprocess.run(command, stdout=subprocess.PIPE, check=True)
    for line in proc.stdout.decode("utf-8").splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "wasm_ecds":
            for filename in message["filenames"]:
                if Path(filename).name == LIBRARY_NAME:
                    return Path(filename)
    raise RuntimeError(f"cargo built no {LIBRARY_NAME}")


class BuildPyWithLibrary(build_py):
    """The package's Python files, plus libwasm_ecds built for this platform."""

    def run(self) -> None:
        super().run()
        built = build_library()
        target = Path(self.build_lib) / "wasm_ecds" / LIBRARY_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)
        os.chmod(target, 0o755)
        # A wheel has no place for debug information; the dynamic symbols ctypes looks up stay.
        if sys.platform.startswith("linux") and shutil.which("strip"):
            subprocess.run(["strip", "--strip-unneeded", str(target)], check=True)


class SdistWithCrate(sdist):
    """The source distribution carries the crate, as `cargo package` defines it, in rust/."""

    def make_release_tree(self, base_dir: str, files: list) -> None:
        super().make_release_tree(base_dir, files)
        destination = Path(base_dir) / "rust"
        if CRATE == SDIST_CRATE:  # an sdist made from an sdist
            shutil.copytree(SDIST_CRATE, destination, ignore=shutil.ignore_patterns("target"))
            return
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run([cargo(), "package", "--quiet", "--no-verify", "--allow-dirty", "--manifest-path",
                            str(CRATE / "Cargo.toml"), "--target-dir", scratch], check=True)
            (crate_file,) = (Path(scratch) / "package").glob("*.crate")
            with tarfile.open(crate_file) as archive:
                for member in archive.getmembers():
                    # Every member is under wasm-ecds-<version>/; it goes under rust/.
                    member.name = member.name.split("/", 1)[1] if "/" in member.name else ""
                    if member.name:
                        if hasattr(tarfile, "data_filter"):
                            archive.extract(member, destination, filter="data")
                        else:
                            archive.extract(member, destination)


class PlatformWheel(bdist_wheel):
    """py3-none-<platform>: the library ties the wheel to a platform, not to a Python version or ABI."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self) -> tuple:
        _, _, platform = super().get_tag()
        return "py3", "none", platform


class DistributionWithLibrary(Distribution):
    def has_ext_modules(self) -> bool:  # installs into platlib, as a wheel with a native library must
        return True


options = {}
if CRATE == REPOSITORY:
    # Building from a checkout: setuptools' scratch files go into the crate's target/, not the source tree.
    scratch = REPOSITORY / "target" / "python-build"
    scratch.mkdir(parents=True, exist_ok=True)
    options["build"] = {"build_base": str(scratch)}
    options["egg_info"] = {"egg_base": str(scratch)}

setup(
    version=crate_version(),
    distclass=DistributionWithLibrary,
    cmdclass={"build_py": BuildPyWithLibrary, "sdist": SdistWithCrate, "bdist_wheel": PlatformWheel},
    options=options,
)
