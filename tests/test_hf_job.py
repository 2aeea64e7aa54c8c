"""A tiny Llama (transformers, with a BPE tokenizer trained on the data) trained by a job
across real py-libp2p hosts on 127.0.0.1: one worker, one round whose task the
coordinator checks and re-executes, the dataset tokenized once per node; then the
version the job published is fetched by another node into a directory (what
``iollm model fetch --out`` does), loaded by transformers.AutoModelForCausalLM and
generating text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.config import WorkerSection
from tests.test_hf_models import TEXT, assert_generates, op
from tests.test_jobs_multinode import cluster, job_toml, run


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hfjob")
    (root / "data").mkdir()
    data = root / "data" / "text.txt"
    data.write_bytes(TEXT * 4)
    request = {"op": "init", "arch": "llama", "size": "tiny", "tokenizer": "bpe",
               "vocab_size": 300, "data_files": [str(data)], "seed": 0,
               "out_dir": str(root / "model")}
    op(request)  # in this process: the test imports transformers anyway
    return {"model": root / "model", "data": data}


@pytest.mark.timeout(150)
def test_tiny_llama_job_end_to_end_and_its_result_loads_in_transformers(
        tmp_path: Path, assets: dict[str, Path]) -> None:
    async def main() -> None:
        async with cluster(tmp_path, [WorkerSection(enabled=False), WorkerSection()]) as nodes:
            import trio

            coordinator = nodes[0]
            assert coordinator.models is not None and coordinator.jobs is not None
            model = await coordinator.models.publish(assets["model"], kind="model",
                                                     name="llama-tiny")
            data = await coordinator.models.publish(assets["data"], kind="dataset",
                                                    name="text")
            with trio.fail_after(30):
                while len(coordinator.discovery.live_records()) < len(nodes):
                    await trio.sleep(0.05)  # capability gossip; bounded by fail_after
            spec = job_toml(model, data, rounds=1, workers=1, inner_steps=8,
                            reexec_fraction=1.0).replace("seq_len = 64", "seq_len = 32")
            jid = await coordinator.jobs.submit(spec)
            await coordinator.jobs.ended(jid).wait()
            status = coordinator.jobs.status(jid)
            assert status["status"] == "done", status
            (rnd,) = status["rounds"]
            assert rnd["accepted"] == 1, json.dumps(rnd, indent=1)
            assert rnd["reexec"] == 1  # re-executed, and accepted: the bits matched
            assert rnd["heldout_after"] < rnd["heldout_before"]
            # Worker and coordinator (check, outer) each tokenized the dataset once, into
            # their store's token cache.
            for n in nodes:
                assert n.models is not None
                cached = list((n.models.store.directory / "tokens").iterdir())
                assert len(cached) == 1, cached
            # Another node fetches the trained version into a directory.
            fetcher = nodes[1].models
            assert fetcher is not None
            out = tmp_path / "fetched"
            await fetcher.fetch(rnd["version"], out_dir=out, kind="model")
            assert sorted(p.name for p in out.iterdir()) == [
                "config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"]
            await trio.to_thread.run_sync(assert_generates, out)

    run(main, timeout=140)
