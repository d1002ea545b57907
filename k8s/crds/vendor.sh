#!/usr/bin/env bash
# Vendor the CRDs the multi-node manifests are written for, from the pinned releases' Go modules
# (the module source carries the release's manifests): tests/test_k8s_manifests.py validates the
# TrainJobs and PyTorchJobs against them strictly, and k8s/local/cluster.sh installs them.
#   Kubeflow Trainer v2.2.0        manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml
#   Kubeflow training-operator v1.9.4  manifests/base/crds/kubeflow.org_pytorchjobs.yaml
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../local/versions.sh"
TRAINING_OPERATOR_VERSION=${TRAINING_OPERATOR_VERSION:-v1.9.4}
module_dir() { go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'; }

vendor() { # MODULE@VERSION PATH-IN-MODULE TARGET
  local dir
  dir=$(module_dir "$1")
  {
    echo "# Vendored by k8s/crds/vendor.sh from the Go module $1, file $2 (unchanged below)."
    cat "$dir/$2"
  } >"$here/$3"
  echo "$3 <- $1 $2"
}

vendor "github.com/kubeflow/trainer/v2@$TRAINER_VERSION" manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml \
  trainer.kubeflow.org_trainjobs.yaml
vendor "github.com/kubeflow/training-operator@$TRAINING_OPERATOR_VERSION" manifests/base/crds/kubeflow.org_pytorchjobs.yaml \
  kubeflow.org_pytorchjobs.yaml
