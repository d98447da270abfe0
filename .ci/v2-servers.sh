#!/usr/bin/env bash
# Virtual environments for the V2 (Open Inference Protocol) inference servers the teacher tests start:
# Seldon MLServer and KServe, each in its own venv (their pins clash with db3kd's and with each other's),
# installed from the lock files beside this script. Idempotent: a venv whose marker matches its lock file is
# reused. Prints the two venv paths as shell exports for DB3KD_V2_MLSERVER_VENV / DB3KD_V2_KSERVE_VENV.
#   bash .ci/v2-servers.sh [ROOT]      (default ROOT: $DB3KD_V2_ROOT, else ~/.cache/db3kd/v2-venvs)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)/v2"
ROOT="${1:-${DB3KD_V2_ROOT:-${HOME:-/root}/.cache/db3kd/v2-venvs}}"
PY="${PYTHON:-python3}"  # mlserver 1.7.1 needs Python < 3.13, kserve 0.21.0 < 3.14

make_venv() {  # DIR LOCKFILE PACKAGE
  local dir="$1" lock="$HERE/$2" package="$3" marker
  marker="$package $("$PY" --version 2>&1) $(sha256sum "$lock" | cut -c1-16)"
  if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.db3kd-marker" 2>/dev/null)" = "$marker" ]; then
    echo "v2-servers: reusing $dir ($marker)" >&2
    return
  fi
  echo "v2-servers: installing $package into $dir" >&2
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/pip" install --quiet --disable-pip-version-check -c "$lock" "$package" onnxruntime numpy prometheus_client
  echo "$marker" > "$dir/.db3kd-marker"
}

mkdir -p "$ROOT"
make_venv "$ROOT/mlserver" requirements-mlserver.lock.txt mlserver==1.7.1
make_venv "$ROOT/kserve" requirements-kserve.lock.txt kserve==0.21.0
echo "export DB3KD_V2_MLSERVER_VENV=$ROOT/mlserver DB3KD_V2_KSERVE_VENV=$ROOT/kserve"
