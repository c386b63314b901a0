#!/usr/bin/env bash
# Installs what the OCI integration tests (tests/oci*.rs) need when it is missing: the distribution registry
# (Debian's `docker-registry`, started by the tests on 127.0.0.1). Quick when it is already there.
# htpasswd files and token signatures are made by the test kit in Rust, so nothing else is needed.
set -euo pipefail

if [ -x /usr/bin/docker-registry ]; then
    exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
# A fresh machine has no package lists yet; refresh them only when the package is not known.
if ! apt-cache show docker-registry >/dev/null 2>&1; then
    "${sudo[@]}" apt-get update -qq
fi
"${sudo[@]}" apt-get install -y -qq --no-install-recommends docker-registry >/dev/null
test -x /usr/bin/docker-registry
