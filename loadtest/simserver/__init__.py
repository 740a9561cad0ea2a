"""A simulated vLLM-compatible model server whose latency comes from an engine model.

Prompts become pseudo-tokens and chained KV block hashes; an LRU prefix cache and a continuous
batching scheduler decide each step's duration, so time to first token depends on cache hits and
load the way it does on a GPU. See :mod:`.engine` for the model and :mod:`.server` for the HTTP
side. Run ``python -m loadtest.simserver --help``.

In-process use::

    async with run_pods(pod_configs(SimConfig(time_scale=0.1), 4)) as pods:
        urls = [pod.url for pod in pods]
"""

from .config import DEFAULT_MODEL, SimConfig
from .engine import Engine, EngineConfig, EngineError, SeqState, Sequence, StepOutput, TokenOutput
from .faults import FaultConfig
from .server import POD_KEY, RunningPod, SimPod, build_app, pod_configs, run_pods, serve_pods

__all__ = [
    "DEFAULT_MODEL",
    "POD_KEY",
    "Engine",
    "EngineConfig",
    "EngineError",
    "FaultConfig",
    "RunningPod",
    "SeqState",
    "Sequence",
    "SimConfig",
    "SimPod",
    "StepOutput",
    "TokenOutput",
    "build_app",
    "pod_configs",
    "run_pods",
    "serve_pods",
]
