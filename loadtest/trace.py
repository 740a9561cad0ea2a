"""Request traces for the harness: the format lives in :mod:`balancer.trace` (installed with
balancer, so ``balancer tune`` reads the same files); this module re-exports it."""

from balancer.trace import (
    Conversation,
    TraceError,
    TraceRecord,
    body_kind,
    dump_trace,
    group_conversations,
    load_trace,
    parse_trace,
    records_of,
    write_trace,
)

__all__ = [
    "Conversation",
    "TraceError",
    "TraceRecord",
    "body_kind",
    "dump_trace",
    "group_conversations",
    "load_trace",
    "parse_trace",
    "records_of",
    "write_trace",
]
