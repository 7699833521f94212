"""Batch tracing: a typed job (:class:`TraceJob`), prompts traced in worker processes and
torchrun ranks, results collected by one writer.

What it may import: ``tracer`` and ``transcoders``, never ``graphstore`` (the command line
passes the store in as a :class:`GraphSink`)."""

from tracer.batch.collect import (
    CACHED,
    DUPLICATE,
    FAILED,
    TRACED,
    Collector,
    PromptResult,
    Summary,
    summary_text,
)
from tracer.batch.job import (
    TraceJob,
    load_replacement,
    read_prompts,
    slug,
    trace_one,
    transcoder_identity_at,
)
from tracer.batch.ranks import RankError, RankGroup, RankInfo, StoreQueue, rank_setting
from tracer.batch.run import GraphSink, SinkError, plan, trace_many

__all__ = [
    "CACHED",
    "DUPLICATE",
    "FAILED",
    "TRACED",
    "Collector",
    "GraphSink",
    "PromptResult",
    "RankError",
    "RankGroup",
    "RankInfo",
    "SinkError",
    "StoreQueue",
    "Summary",
    "TraceJob",
    "load_replacement",
    "plan",
    "rank_setting",
    "read_prompts",
    "slug",
    "summary_text",
    "trace_many",
    "trace_one",
    "transcoder_identity_at",
]
