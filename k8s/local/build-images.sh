#!/usr/bin/env bash
# Build the small images the local cluster runs, from Go sources, as docker images FROM scratch
# (no registry can be reached): each binary is cached in $CLUSTER_CACHE/<name>-<version>/.
#   k8s/local/build-images.sh pause coredns trainer jobset minio
# -> localhost/medcritical-<name>:<version>; `cluster.sh load` puts them into the node's containerd.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"
# The images are built with Docker: start its engine when it is not running (a no-op otherwise).
"$here/../../images/local/docker-engine.sh" start >/dev/null

gobuild() { # NAME VERSION MODULE@VERSION PACKAGE: go install into $CLUSTER_CACHE/NAME-VERSION/bin
  local name=$1 version=$2 module=$3 package=$4 out=$CLUSTER_CACHE/$1-$2/bin
  if [ -x "$out/$name" ]; then return; fi
  mkdir -p "$out"
  echo "building $name $version" >&2
  # A throwaway module pins the version; `go install pkg@version` would refuse modules with replaces.
  local work
  work=$(mktemp -d)
  (
    cd "$work"
    go mod init medcritical.local/build-"$name" >/dev/null 2>&1
    # The package at the module's version: go get records the sums of everything it imports.
    go get "$package@${module##*@}" >/dev/null 2>&1 || go get "$package@${module##*@}"
    go build -trimpath -ldflags "-s -w ${LDFLAGS:-}" -o "$out/$name" "$package"
  )
  rm -rf "$work"
}

image() { # NAME VERSION BINARY-FOLDER [USER [PATH]]: docker image FROM scratch, the binary the entrypoint
  local name=$1 version=$2 dir=$3 user=${4:-65532} path=${5:-/$1} tag=localhost/medcritical-$1:$2
  if docker image inspect "$tag" >/dev/null 2>&1; then return; fi
  printf 'FROM scratch\nCOPY %s %s\nUSER %s\nENTRYPOINT ["%s"]\n' "$name" "$path" "$user" "$path" |
    docker build -q -t "$tag" -f - "$dir" >/dev/null
  echo "built $tag" >&2
}

for what in "$@"; do
  case $what in
    pause)
      out=$CLUSTER_CACHE/pause-3.10/bin
      if [ ! -x "$out/pause" ]; then
        mkdir -p "$out"
        (cd "$here/pause" && go build -trimpath -ldflags "-s -w" -o "$out/pause" .)
      fi
      image pause 3.10 "$out" 65535
      ;;
    coredns)
      gobuild coredns "$COREDNS_VERSION" "github.com/coredns/coredns@$COREDNS_VERSION" github.com/coredns/coredns
      image coredns "$COREDNS_VERSION" "$CLUSTER_CACHE/coredns-$COREDNS_VERSION/bin"
      ;;
    trainer)
      gobuild trainer-controller-manager "$TRAINER_VERSION" "github.com/kubeflow/trainer/v2@$TRAINER_VERSION" \
        github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager
      image trainer-controller-manager "$TRAINER_VERSION" "$CLUSTER_CACHE/trainer-controller-manager-$TRAINER_VERSION/bin"
      ;;
    jobset)
      gobuild jobset "$JOBSET_VERSION" "sigs.k8s.io/jobset@$JOBSET_VERSION" sigs.k8s.io/jobset
      # JobSet's Deployment runs /manager.
      image jobset "$JOBSET_VERSION" "$CLUSTER_CACHE/jobset-$JOBSET_VERSION/bin" 65532 /manager
      ;;
    minio)
      gobuild minio "$MINIO_VERSION" "github.com/minio/minio@$MINIO_VERSION" github.com/minio/minio
      image minio "$MINIO_VERSION" "$CLUSTER_CACHE/minio-$MINIO_VERSION/bin" 10001
      ;;
    *)
      echo "unknown image $what (pause coredns trainer jobset minio)" >&2
      exit 2
      ;;
  esac
done
