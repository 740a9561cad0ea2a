"""Request traces for the harness: the format lives in :mod:`balancer.trace` (installed with
balancer, so ``balancer tune`` reads the same files); this module re-exports it."""

from balancer.trace import *  # noqa: F403
from balancer.trace import __all__ as __all__
