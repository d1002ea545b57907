"""Shared fixtures. Heavy ones (the tiny model, the S3 server) are session-scoped and built once."""

import os

# On 2 busy cores torch's default thread count collapses throughput; tests run single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.s3",
    "tests.fixtures.selfplay",
    "tests.fixtures.vllm",
    "tests.fixtures.served",
]
