# Images and Kubernetes shortcuts; docs/kubernetes.md explains each.
#   make images | image-cpu | image-train | image-infer     build, tagged with pyproject's version
#   make base-image                                         Debian base built locally (offline hosts)
#   make images-cuda-local                                  both CUDA images on the local base (no registry), smoke-tested
#   make image-smoke IMAGE=medcritical-train-cuda:0.1.0     the smoke test of a built image (no GPU)
#   make docker-test                                        the image tier: CPU image built + run, CUDA pins resolved
#   make docker-test-cuda                                   the image tier and the CUDA images built + smoke-tested
#   make k8s-validate                                       offline manifest checks
#   make k8s-dev-up                                         MinIO dev setup on the current kube context
#   make test-cluster                                       the cluster tests on the current kube context
#   make cluster-up | cluster-down | cluster-status         the local one-node cluster (k8s/local/cluster.sh)
#   make cluster-trainer                                    Kubeflow Trainer + JobSet into the local cluster
#   make test-cluster-local                                 the cluster tier on the local cluster (up, tests, down)

PYTHON ?= .venv/bin/python
KUBECTL ?= $(dir $(PYTHON))kubectl
NAMESPACE ?= medcritical

.PHONY: images image-cpu image-train image-infer images-cuda-local image-smoke base-image docker-engine \
        docker-test docker-test-cuda \
        k8s-validate k8s-dev-secret k8s-dev-up test-cluster \
        cluster-up cluster-down cluster-status cluster-trainer test-cluster-local

images:
	images/build.sh all

image-cpu:
	images/build.sh cpu

image-train:
	images/build.sh train-cuda

image-infer:
	images/build.sh infer-cuda

docker-engine:
	images/local/docker-engine.sh start

base-image: docker-engine
	images/local/build-base.sh

images-cuda-local:
	images/local/build-cuda-images.sh all

image-smoke:
	images/smoke-test.sh $(IMAGE)

docker-test:
	MEDCRITICAL_DOCKER_TESTS=1 $(PYTHON) -m pytest -m docker tests/test_images.py -v

docker-test-cuda:
	MEDCRITICAL_DOCKER_TESTS=1 MEDCRITICAL_CUDA_IMAGE_TESTS=1 $(PYTHON) -m pytest -m docker tests/test_images.py -v

k8s-validate:
	$(PYTHON) -m pytest tests/test_k8s_manifests.py -q

# The dev overlay's Secrets: medcritical-s3 (the steps' MinIO user) and medcritical-minio-root (MinIO's
# root user, for MinIO and its bucket Job only), random keys in k8s/secrets/{s3,minio-root}.env
# (git-ignored), written once; the Secrets are created or updated from them.
k8s-dev-secret:
	@if [ ! -f k8s/secrets/s3.env ]; then \
	    sed -e "s/^AWS_ACCESS_KEY_ID=.*/AWS_ACCESS_KEY_ID=medcritical-$$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')/" \
	        -e "s/^AWS_SECRET_ACCESS_KEY=.*/AWS_SECRET_ACCESS_KEY=$$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')/" \
	        k8s/secrets/s3.env.example | grep -v '^#' > k8s/secrets/s3.env; \
	    echo "wrote k8s/secrets/s3.env"; \
	fi
	$(KUBECTL) -n $(NAMESPACE) create secret generic medcritical-s3 --from-env-file=k8s/secrets/s3.env \
	    --dry-run=client -o yaml | $(KUBECTL) apply -f -
	@if [ ! -f k8s/secrets/minio-root.env ]; then \
	    sed -e "s/^MINIO_ROOT_USER=.*/MINIO_ROOT_USER=root-$$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')/" \
	        -e "s/^MINIO_ROOT_PASSWORD=.*/MINIO_ROOT_PASSWORD=$$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')/" \
	        k8s/secrets/minio-root.env.example | grep -v '^#' > k8s/secrets/minio-root.env; \
	    echo "wrote k8s/secrets/minio-root.env"; \
	fi
	$(KUBECTL) -n $(NAMESPACE) create secret generic medcritical-minio-root --from-env-file=k8s/secrets/minio-root.env \
	    --dry-run=client -o yaml | $(KUBECTL) apply -f -

k8s-dev-up:
	$(KUBECTL) apply -k k8s/base
	$(MAKE) k8s-dev-secret
	$(KUBECTL) apply -k k8s/overlays/dev
	$(KUBECTL) -n $(NAMESPACE) rollout status deployment/minio --timeout=300s
	$(KUBECTL) -n $(NAMESPACE) wait --for=condition=complete job/minio-create-buckets --timeout=300s

test-cluster:
	$(PYTHON) -m pytest -m cluster tests/test_k8s_cluster.py -v

cluster-up:
	k8s/local/cluster.sh up

cluster-down:
	k8s/local/cluster.sh down

cluster-status:
	k8s/local/cluster.sh status

cluster-trainer:
	k8s/local/cluster.sh trainer

test-cluster-local:
	MEDCRITICAL_CLUSTER=local $(PYTHON) -m pytest -m cluster tests/test_k8s_cluster.py -v
