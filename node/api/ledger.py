"""The local API's routes for the chain and the ledger (node/chain/service.py).

    GET  /v1/ledger                         -> chain id, height, state root, validators
    GET  /v1/ledger/balance?peer=           -> {"peer", "balance", "height"} (default: this node)
    GET  /v1/ledger/balances                -> [{"peer", "balance"}], largest first
    GET  /v1/ledger/blocks?limit=           -> [block summary], newest first
    GET  /v1/ledger/blocks?from=H&limit=&txs=1 -> [block summary] from height H up, with
                                                  the tx ids when txs=1
    GET  /v1/ledger/tx?id=                  -> {"tx", "final": height | null, "pending"}
    POST /v1/ledger/txs  {"txs": [hex]}     -> {"ids": [hex]}   (checked, gossiped, kept)
    POST /v1/ledger/revenue {"model", "amount", "memo"} -> {"tx", "nonce"}
    POST /v1/ledger/wait {"txs": [hex], "timeout"}      -> {"final": {id: height}}
    POST /v1/ledger/records {"job", "receipts", "versions", "timeout"}
                            -> {"height", "job": entry | null, "receipts": {id: height},
                                "versions": {id: height}}   (waits until all are final)

A node started without a genesis answers 409 on each: it follows no chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from node.api.server import ApiError, Gated, Request, Routes, body_fields, text_field
from node.chain.service import Chain
from protocol.consensus import Commit
from protocol.envelope import unpack_strict
from protocol.errors import ProtocolError, RemoteProtocolError
from protocol.ledger import Block, Ledger, Revenue, block_id, tx_id
from protocol.peerid import public_key_from_peer_id

MAX_LIST = 1000
MAX_SUBMIT = 1000  # txs in one POST /v1/ledger/txs (the 1 MiB body cap binds first)
MAX_WAIT_S = 600.0
MAX_IDS = 15_000  # ids in one POST /v1/ledger/records (a job's receipts; the body cap binds)


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be in [{lo}, {hi}]")
    return value


def _hex_id(value: Any, name: str) -> bytes:
    text = text_field(value, name).strip().lower()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ApiError(400, f"{name}: expected 64 hex digits, got {text[:80]!r}")
    return raw


def _hex_ids(value: Any, name: str) -> list[bytes]:
    if not isinstance(value, list) or len(value) > MAX_IDS:
        raise ApiError(400, f"{name}: expected a list of at most {MAX_IDS} ids")
    return [_hex_id(v, name) for v in value]


def _timeout(body: dict[str, Any], default: float = 60) -> float:
    timeout = body.get("timeout", default)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) \
            or not 0 <= timeout <= MAX_WAIT_S:
        raise ApiError(400, f"timeout: expected seconds in [0, {MAX_WAIT_S:g}]")
    return float(timeout)


def block_summary(data: bytes, commit: bytes, max_bytes: int, with_txs: bool = False
                  ) -> dict[str, Any]:
    block = Block.decode(data, max_bytes)
    kinds: dict[str, int] = {}
    for tx in block.txs:  # the ledger checked each when the block came: [kind, payload]
        kind = unpack_strict(tx, len(tx))[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    c = Commit.decode(commit)
    return {"height": block.height, "id": block_id(data).hex(), "time_ms": block.time_ms,
            "proposer": block.proposer, "prev": block.prev_id.hex(),
            "state_root": block.state_root.hex(), "txs": len(block.txs), "kinds": kinds,
            "bytes": len(data), "commit_round": c.round, "signatures": len(c.votes),
            **({"tx_ids": [tx_id(t).hex() for t in block.txs]} if with_txs else {})}


def ledger_totals(led: Ledger) -> dict[str, int]:
    """Where every unit came from; the balances sum to ``supply``."""
    return {"allocated": led.allocated, "emitted": led.emitted, "revenue": led.revenue,
            "supply": led.supply, "receipts": led.receipts_counted}


def ledger_routes(chain: Chain | None, resolve_model: Callable[[Any], str],
                  name_of: Callable[[str], str] = lambda _: "") -> Routes:
    """``name_of(peer)``: the name a peer's capability record gives it ("" if none)."""
    def need() -> Chain:
        if chain is None:
            raise ApiError(409, "this node follows no chain: start it with "
                                "`iollm node start --genesis FILE`")
        return chain

    async def info(_: Request) -> Any:
        c = need()
        led = c.ledger
        return {"chain_id": c.genesis.chain_id, "genesis": c.genesis.id.hex(),
                "height": led.height, "block": led.last_block_id.hex(),
                "state_root": led.state_root().hex(), "validator": c.is_validator,
                "validators": [{"peer": v.peer_id, "power": v.power}
                               for v in c.genesis.validators],
                "mempool": len(c.mempool), "totals": ledger_totals(led)}

    async def balance(request: Request) -> Any:
        c = need()
        peer = (request.query.get("peer") or "").strip() or c.peer_id
        try:
            public_key_from_peer_id(peer)
        except RemoteProtocolError:
            raise ApiError(400, f"peer: {peer[:80]!r} is not a peer id (12D3KooW...)") from None
        return {"peer": peer, "balance": c.ledger.balance(peer), "height": c.ledger.height,
                "name": name_of(peer)}

    async def balances(_: Request) -> Any:
        c = need()
        items = sorted(c.ledger.balances().items(), key=lambda kv: (-kv[1], kv[0]))
        return [{"peer": p, "balance": b, "name": name_of(p)} for p, b in items]

    async def blocks(request: Request) -> Any:
        c = need()
        limit = _int_param(request, "limit", 20, 1, MAX_LIST)
        start = _int_param(request, "from", 0, 0, 2**62)
        with_txs = request.query.get("txs") in ("1", "true")
        rows = (await c.storage.get_blocks(start, limit) if start
                else await c.storage.last_blocks(limit))
        return [block_summary(data, commit, c.genesis.max_block_bytes, with_txs)
                for _, data, commit in rows]

    async def tx_status(request: Request) -> Any:
        c = need()
        tid = _hex_id(request.query.get("id"), "id")
        return {"tx": tid.hex(), "final": await c.final_height(tid),
                "pending": tid in c.mempool}

    def submit_gate() -> None:
        """A chain over its finality budget refuses a batch before it is read."""
        if chain is not None:
            chain.refuse_if_busy(1)

    async def submit(request: Request) -> Any:
        c = need()
        body = body_fields(request, {"txs"})
        txs = body["txs"]
        if not isinstance(txs, list) or not 1 <= len(txs) <= MAX_SUBMIT:
            raise ApiError(400, f"txs: expected a list of 1..{MAX_SUBMIT} hex strings")
        try:
            raw = [bytes.fromhex(text_field(t, "txs")) for t in txs]
        except ValueError:
            raise ApiError(400, "txs: every entry must be hex") from None
        try:
            ids = await c.submit_many(raw, refuse_when_busy=True)
        except ProtocolError as exc:
            raise ApiError(400, f"txs: {exc}") from None
        return {"ids": [t.hex() for t in ids]}

    async def revenue(request: Request) -> Any:
        c = need()
        body = body_fields(request, {"model", "amount"}, {"memo"})
        model = bytes.fromhex(resolve_model(body["model"]))
        amount = body["amount"]
        if not isinstance(amount, int) or isinstance(amount, bool) or amount < 1:
            raise ApiError(400, "amount: expected a whole number of units >= 1")
        memo = body.get("memo") or ""
        if not isinstance(memo, str):
            raise ApiError(400, "memo: expected a string")
        # A record for a model the ledger does not know would wait (unknown-model is a
        # retry) and hold its nonce: every later record of this node would then wait
        # behind it (nonce-gap). So only a version some final round record made is taken.
        if c.ledger.version_entry(model) is None:
            if any(tx.kind == "round" and tx.record.version == model
                   for tx in c.mempool.candidates()):
                raise ApiError(409, f"model: the round record of {model.hex()[:16]} is not "
                                    f"final yet; try again in a few seconds")
            raise ApiError(404, f"model: no round record on the chain produced "
                                f"{model.hex()[:16]}, so it has no lineage to pay; revenue "
                                f"is recorded for a version a job made (`iollm job status "
                                f"JOB` shows each round's version)")
        nonce = c.next_nonce()
        try:
            record = Revenue(chain_id=c.genesis.chain_id, payer=c.peer_id, model=model,
                             amount=amount, nonce=nonce, memo=memo)
            tid = await c.submit("revenue", record.seal(c.key))
        except ProtocolError as exc:
            raise ApiError(400, str(exc)) from None
        return {"tx": tid.hex(), "nonce": nonce}

    async def wait(request: Request) -> Any:
        c = need()
        body = body_fields(request, {"txs"}, {"timeout"})
        if not isinstance(body["txs"], list) or not body["txs"]:
            raise ApiError(400, "txs: expected a list of tx ids")
        ids = [_hex_id(t, "txs") for t in body["txs"]]
        final = await c.wait_final(ids, _timeout(body))
        return {"final": {t.hex(): h for t, h in final.items()}}

    async def records(request: Request) -> Any:
        """What the ledger holds of a job: its entry, which of the given receipts are
        counted and which versions a round record made, each with its block's height;
        waits up to ``timeout`` for all of them. Reads the ledger itself, not the recent
        tx index, so it answers for records finalized before the node's last restart."""
        c = need()
        body = body_fields(request, {"job"}, {"receipts", "versions", "timeout"})
        jid = _hex_id(body["job"], "job")
        receipts = _hex_ids(body.get("receipts", []), "receipts")
        versions = _hex_ids(body.get("versions", []), "versions")
        deadline = trio.current_time() + _timeout(body)
        while True:
            led = c.ledger  # replaced at every final block: read it afresh each time
            job = led.job(jid)
            got_r = {r.hex(): e.height for r in receipts
                     if (e := led.receipt(r)) is not None and e.job_id == jid}
            got_v = {v.hex(): ve.height for v in versions
                     if (ve := led.version_entry(v)) is not None and ve.job_id == jid}
            done = job is not None and len(got_r) == len(set(receipts)) \
                and len(got_v) == len(set(versions))
            left = deadline - trio.current_time()
            if done or left <= 0:
                break
            await c.wait_height(led.height + 1, left)
        entry = None if job is None else {
            "height": job.height, "designer": job.designer,
            "designer_share_bps": job.designer_share_bps, "rounds": job.rounds,
            "reward_pool": job.reward_pool, "base_model": job.base_model.hex(),
            "best_loss": None if job.best_micro is None else job.best_micro / 1e6}
        return {"height": led.height, "job": entry, "receipts": got_r, "versions": got_v}

    return {
        ("GET", "/v1/ledger"): info,
        ("GET", "/v1/ledger/balance"): balance,
        ("GET", "/v1/ledger/balances"): balances,
        ("GET", "/v1/ledger/blocks"): blocks,
        ("GET", "/v1/ledger/tx"): tx_status,
        ("POST", "/v1/ledger/txs"): Gated(submit, submit_gate),
        ("POST", "/v1/ledger/revenue"): revenue,
        ("POST", "/v1/ledger/wait"): wait,
        ("POST", "/v1/ledger/records"): records,
    }
