"""The environment vLLM's CPU build runs in here (offline, loopback, no usage stats, 2 GB of KV)."""

import os

VLLM_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def apply() -> None:
  """Sets every variable the caller has not set itself; call before importing vllm."""
  for key, value in VLLM_ENV.items():
    os.environ.setdefault(key, value)
