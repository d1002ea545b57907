# Pinned versions of everything the local cluster runs (sourced by k8s/local/*.sh).
# Kubernetes 1.34: the last minor whose kubelet accepts cgroup v1 without failCgroupV1: false
# (these VMs mount the v1 controllers); v1.34.4 is the newest 1.34 the Go module proxy serves.
K8S_VERSION=${K8S_VERSION:-v1.34.4}
# Each k8s.io staging module is published as v0.<minor>.<patch> of the same release.
K8S_STAGING_VERSION=v0${K8S_VERSION#v1}
COREDNS_VERSION=${COREDNS_VERSION:-v1.12.4}
MINIO_VERSION=${MINIO_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}
# Kubeflow Trainer and the JobSet release its go.mod requires.
TRAINER_VERSION=${TRAINER_VERSION:-v2.2.0}
JOBSET_VERSION=${JOBSET_VERSION:-v0.11.1}
# Everything built is cached here, keyed by version, so a second bring-up and CI reuse it.
CLUSTER_CACHE=${CLUSTER_CACHE:-$HOME/.cache/medcritical/cluster}
export GOCACHE=${GOCACHE_CLUSTER:-$CLUSTER_CACHE/go-build}
export GOFLAGS=-buildvcs=false
export CGO_ENABLED=0
