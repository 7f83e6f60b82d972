#!/bin/bash
# Builds a real kube-apiserver (v1.20.2, the newest Kubernetes source Debian 12 ships) for the integration
# tier of tests/test_kubernetes_jobs.py, and caches it. No registry has a prebuilt binary, so it is built
# from Debian's `kubernetes` source package with Debian's Go, fully offline from the Debian mirror:
# about 8 minutes and 3 GB of scratch on 2 cores, once; the cache keeps only the 110 MB binary.
#
#   deploy/tools/build_kube_apiserver.sh [CACHE_DIR]   (default: ~/.cache/megatron-rl/kube-apiserver)
#
# Prints the binary's path. Needs root for apt-get (golang-go, rsync) unless they are installed.
set -euo pipefail

# The same place tests/kube_apiserver.py looks (Python's Path.home() when HOME is unset).
HOME_DIR=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
CACHE_DIR=${1:-${XDG_CACHE_HOME:-$HOME_DIR/.cache}/megatron-rl/kube-apiserver}
BINARY=$CACHE_DIR/v1.20.2/kube-apiserver
if [ -x "$BINARY" ]; then echo "$BINARY"; exit 0; fi

for command in go rsync; do
    if ! command -v $command >/dev/null; then
        [ "$(id -u)" = 0 ] || { echo "need golang-go and rsync; run as root: apt-get install -y golang-go rsync" >&2; exit 1; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends golang-go rsync >&2
    fi
done

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# A private deb-src list, so that the machine's apt configuration stays as it is.
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/apt/parts"
sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$WORK/apt/parts/src.sources"
APT=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$WORK/apt/parts"
     -o "Dir::State::Lists=$WORK/apt/lists" -o "Dir::Cache=$WORK/apt/cache")
cd "$WORK"
echo "fetching Debian's kubernetes source package" >&2
apt-get "${APT[@]}" -qq update >&2
apt-get "${APT[@]}" -qq source --download-only kubernetes >&2
tar xzf kubernetes_*.orig.tar.gz
# The vendored reflect2 1.0.1 crashes (SIGSEGV in map encoding) under Go >= 1.18; Debian's 1.0.2 does not.
apt-get -qq download golang-github-modern-go-reflect2-dev >&2
dpkg -x golang-github-modern-go-reflect2-dev_*.deb reflect2
cd kubernetes-1.20.2
rm -rf vendor/github.com/modern-go/reflect2
cp -r ../reflect2/usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
rm -f vendor/github.com/modern-go/reflect2/go.mod
# The 1.20 build predates modules for the main tree: GOPATH mode with the tree linked in as k8s.io/kubernetes.
mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
echo "building kube-apiserver (several minutes)" >&2
env GOPATH="$PWD/.go" CGO_ENABLED=0 GOPROXY=off HOME="$WORK" \
    make WHAT=cmd/kube-apiserver >&2
mkdir -p "$(dirname "$BINARY")"
cp _output/bin/kube-apiserver "$BINARY.partial"
mv "$BINARY.partial" "$BINARY"
echo "$BINARY"
