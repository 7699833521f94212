"""The rank plumbing of many-prompt tracing, without launching ranks: launcher variables, the
deterministic shares, the rank's device, the TCPStore queue, the summary."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tracer.batch import (
    FAILED,
    TRACED,
    PromptResult,
    RankError,
    RankInfo,
    StoreQueue,
    Summary,
    rank_setting,
    summary_text,
)


def test_rank_info_from_env():
    assert RankInfo.from_env({}) == RankInfo(0, 1, 0, 1)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    info = RankInfo.from_env(env)
    assert info == RankInfo(3, 4, 1, 2) and info.distributed and not info.is_writer
    with pytest.raises(RankError, match="WORLD_SIZE is not"):
        RankInfo.from_env({"RANK": "0"})
    with pytest.raises(RankError, match="not in 0..WORLD_SIZE-1"):
        RankInfo.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(RankError, match="not an integer"):
        RankInfo.from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_shares_cover_every_item_once():
    items = list(range(11))
    for world in (1, 2, 3, 4):
        shares = [RankInfo(r, world, r, world).share(items) for r in range(world)]
        flat = sorted(x for s in shares for x in s)
        assert flat == items
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert RankInfo(1, 3, 1, 3).share(items) == [1, 4, 7, 10]


def test_rank_setting_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = RankInfo(1, 2, 1, 2)
    assert rank_setting(info).device == torch.device("cpu")
    assert rank_setting(info, "cpu", "bfloat16").dtype == torch.bfloat16


def test_rank_setting_picks_local_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    from transcoders.device import DeviceError

    assert rank_setting(RankInfo(3, 4, 1, 2)).device == torch.device("cuda", 1)
    assert rank_setting(RankInfo(3, 4, 1, 2), "cuda").device == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="local rank 2 has no GPU"):
        rank_setting(RankInfo(2, 3, 2, 3))


def test_store_queue_is_fifo_and_reads_once():
    master = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=10),
                           wait_for_workers=False)  # fmt: skip
    client = dist.TCPStore("127.0.0.1", master.port, None, False, timedelta(seconds=10))
    writer, reader = StoreQueue(client), StoreQueue(master)
    assert reader.get(timeout=0.05) is None
    for k in range(5):
        writer.put({"index": k, "text": "é" * k})
    got = [reader.get(timeout=1.0) for _ in range(5)]
    assert [m["index"] for m in got] == list(range(5)) and got[3]["text"] == "ééé"
    assert reader.get(timeout=0.05) is None


def test_summary_counts_and_text():
    results = [
        PromptResult(0, "a", TRACED, "p0", "f0", rank=0, stored=True),
        PromptResult(1, "b", TRACED, "p1", "f1", rank=1, stored=False, reason="server gone"),
        PromptResult(2, "", FAILED, reason="empty prompt: give at least one non-blank character"),
        PromptResult(3, "a", "duplicate", "p0", "f0", reason="same as prompt #1"),
        PromptResult(4, "c", "cached", "p4", "f4", stored=True),
    ]
    s = Summary.of(results, 30.0, 2)
    assert (s.prompts, s.traced, s.skipped, s.failed, s.not_stored) == (5, 2, 2, 1, 1)
    assert s.graphs_per_minute == pytest.approx(4.0) and s.per_rank == {0: 1, 1: 1}
    text = summary_text(results, s, "out")
    assert text.splitlines()[0].startswith("5 prompts on 2 ranks: 2 traced, 2 skipped")
    assert "(4.0 graphs/min)" in text and "rank 0: 1, rank 1: 1" in text
    assert "failed: prompt #3 '': empty prompt" in text
    assert "not stored: prompt #2 'b': server gone" in text
