#!/usr/bin/env bash
# Build the Kubernetes servers and kubectl from the Go module proxy into
# $CLUSTER_CACHE/kubernetes-$K8S_VERSION/bin (skipped when they are there already).
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces every k8s.io staging module
# with a local folder. A module of our own requires it and replaces each staging module with
# its published v0.X.Y instead, then builds the commands from the module cache.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"

out=$CLUSTER_CACHE/kubernetes-$K8S_VERSION
bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
missing=()
for b in "${bins[@]}"; do [ -x "$out/bin/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "kubernetes $K8S_VERSION: cached in $out/bin"
  exit 0
fi

mkdir -p "$out/src" "$out/bin"
cd "$out/src"
gomod=$(go env GOPROXY | cut -d, -f1)/k8s.io/kubernetes/@v/$K8S_VERSION.mod
if [ ! -f go.mod ]; then
  upstream=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module medcritical.local/kubernetes-build"
    echo
    sed -n 's/^go \(.*\)/go \1/p' "$upstream"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    # Every `k8s.io/X => ./staging/src/k8s.io/X` becomes `k8s.io/X => k8s.io/X v0.Y.Z`.
    sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 '"$K8S_STAGING_VERSION"'#p' "$upstream"
    echo ")"
  } > go.mod
fi
pkgs=()
for b in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
go get "${pkgs[@]/%/@$K8S_VERSION}" >/dev/null
# The version the binaries report (kubectl version, node status, API discovery).
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
echo "building ${missing[*]} (kubernetes $K8S_VERSION) into $out/bin"
go build -trimpath -ldflags "$ld" -o "$out/bin/" "${pkgs[@]}"
echo "kubernetes $K8S_VERSION: built"
