"""node/jobs/worker.py requirement checks and node/jobs/receipts.py: receipts stored once, forged
ones refused, this node's feed an unbroken chain. No network: storage on disk only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
from nacl.signing import SigningKey

from node.jobs.receipts import Receipts
from node.jobs.worker import meets_requirements
from node.storage import open_storage
from protocol.errors import RemoteProtocolError
from protocol.feed import FEED_KIND_RECEIPT, open_entry, verify_chain
from protocol.jobs import Job, TaskResult, issue_receipt, seal_task_result, spec_with_defaults
from protocol.peerid import peer_id_from_public_key
from tests.netutil import make_env

KEYS = [SigningKey(bytes([i]) * 32) for i in range(1, 4)]
PEERS = [peer_id_from_public_key(bytes(k.verify_key)) for k in KEYS]


def job(**values: object) -> Job:
    spec = spec_with_defaults(name="t", base_model=b"\x01" * 32, dataset=b"\x02" * 32,
                              rounds=1, workers_per_round=1, inner_steps=1, **values)
    return Job(spec, PEERS[0], 1)


def test_requirements_device_and_gpu_memory() -> None:
    cpu, gpu24, gpu80 = make_env(), make_env((24,)), make_env((80,))
    assert meets_requirements(job(), cpu) == ""
    assert "CUDA" in meets_requirements(job(device="cuda"), cpu)
    assert meets_requirements(job(device="cuda"), gpu24) == ""
    assert "at least 40 GB" in meets_requirements(job(min_vram_gb=40), gpu24)
    assert meets_requirements(job(min_vram_gb=40), gpu80) == ""
    # The lean memory mode needs bf16 on a GPU: a node with only pre-Ampere cards (fp16
    # and a loss scaler) does not take it; the CPU and a bf16 card do.
    old_gpu = dataclasses.replace(gpu24, gpus=tuple(dataclasses.replace(
        g, compute_capability="7.5") for g in gpu24.gpus))
    assert "bf16" in meets_requirements(job(memory="lean"), old_gpu)
    assert meets_requirements(job(), old_gpu) == ""
    assert meets_requirements(job(memory="lean"), gpu24) == ""
    assert meets_requirements(job(memory="lean"), cpu) == ""
    new_gpu = dataclasses.replace(gpu24, gpus=tuple(dataclasses.replace(
        g, compute_capability="10.0") for g in gpu24.gpus))
    assert meets_requirements(job(memory="lean"), new_gpu) == ""  # 10 > 8, not "10" < "8"


def receipt(worker: int, task: str, *, coordinator: int = 0) -> bytes:
    result = seal_task_result(KEYS[worker], TaskResult(b"\x03" * 32, 0, task, PEERS[worker],
                                                       b"\x04" * 32, 3.0, 2.0, 100, 5))
    return issue_receipt(KEYS[coordinator], result, metrics={"heldout_gain": 0.1}, issued_ms=7)


def test_receipts_are_stored_once_chained_in_the_feed_and_forgeries_refused(tmp_path: Path
                                                                           ) -> None:
    async def main() -> None:
        with trio.fail_after(30):
            await body()

    async def body() -> None:
        async with open_storage(tmp_path / "s.db") as storage:
            mine = Receipts(storage, KEYS[1], PEERS[1], lambda: 1000)
            good = receipt(1, "r0-t0")
            await mine.store(good, expect_worker=PEERS[1])
            await mine.store(good, expect_worker=PEERS[1])  # replayed: counted once
            await mine.store(receipt(1, "r0-t1"), expect_worker=PEERS[1])
            assert len(await storage.list_receipts()) == 2
            with pytest.raises(RemoteProtocolError):  # another worker's receipt
                await mine.store(receipt(2, "r0-t2"), expect_worker=PEERS[1])
            tampered = bytearray(good)
            tampered[-3] ^= 1
            with pytest.raises(RemoteProtocolError):
                await mine.store(bytes(tampered))
            entries = [e for _, _, e in await storage.feed_entries(PEERS[1])]
            chain = verify_chain(entries, author=PEERS[1])
            assert [e.seq for e in chain] == [1, 2]
            assert {e.kind for e in chain} == {FEED_KIND_RECEIPT}
            assert open_entry(entries[0]).payload == good
            listed = await mine.list()
            assert [r["task"] for r in listed] == ["r0-t0", "r0-t1"]
            assert listed[0]["metrics"] == {"heldout_gain": 0.1}

    trio.run(main)
