"""The local API's routes for the chain and the ledger (node/consensus.py).

    GET  /v1/ledger                         -> chain id, height, state root, validators
    GET  /v1/ledger/balance?peer=           -> {"peer", "balance", "height"} (default: this node)
    GET  /v1/ledger/balances                -> [{"peer", "balance"}], largest first
    GET  /v1/ledger/blocks?limit=&from=     -> [block summary], newest first
    GET  /v1/ledger/tx?id=                  -> {"tx", "final": height | null, "pending"}
    POST /v1/ledger/txs  {"txs": [hex]}     -> {"ids": [hex]}   (checked, gossiped, kept)
    POST /v1/ledger/revenue {"model", "amount", "memo"} -> {"tx", "nonce"}
    POST /v1/ledger/wait {"txs": [hex], "timeout"}      -> {"final": {id: height}}

A node started without a genesis answers 409 on each: it follows no chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from node.api import ApiError, Request, Routes, body_fields, text_field
from node.consensus import Chain
from protocol.consensus import Commit
from protocol.envelope import unpack_strict
from protocol.errors import ProtocolError
from protocol.ledger import Block, Ledger, Revenue, block_id

MAX_LIST = 1000
MAX_SUBMIT = 5000  # txs in one POST /v1/ledger/txs
MAX_WAIT_S = 600.0


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


def block_summary(data: bytes, commit: bytes, max_bytes: int) -> dict[str, Any]:
    block = Block.decode(data, max_bytes)
    kinds: dict[str, int] = {}
    for tx in block.txs:  # the ledger checked each when the block came: [kind, payload]
        kind = unpack_strict(tx, len(tx))[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    c = Commit.decode(commit)
    return {"height": block.height, "id": block_id(data).hex(), "time_ms": block.time_ms,
            "proposer": block.proposer, "prev": block.prev_id.hex(),
            "state_root": block.state_root.hex(), "txs": len(block.txs), "kinds": kinds,
            "bytes": len(data), "commit_round": c.round, "signatures": len(c.votes)}


def ledger_totals(led: Ledger) -> dict[str, int]:
    """Where every unit came from; the balances sum to ``supply``."""
    return {"allocated": led.allocated, "emitted": led.emitted, "revenue": led.revenue,
            "supply": led.supply, "receipts": led.receipts_counted}


def ledger_routes(chain: Chain | None, resolve_model: Callable[[Any], str]) -> Routes:
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
        return {"peer": peer, "balance": c.ledger.balance(peer), "height": c.ledger.height}

    async def balances(_: Request) -> Any:
        c = need()
        items = sorted(c.ledger.balances().items(), key=lambda kv: (-kv[1], kv[0]))
        return [{"peer": p, "balance": b} for p, b in items]

    async def blocks(request: Request) -> Any:
        c = need()
        limit = _int_param(request, "limit", 20, 1, MAX_LIST)
        rows = await c.storage.last_blocks(limit)
        return [block_summary(data, commit, c.genesis.max_block_bytes)
                for _, data, commit in rows]

    async def tx_status(request: Request) -> Any:
        c = need()
        tid = _hex_id(request.query.get("id"), "id")
        return {"tx": tid.hex(), "final": c.final_height(tid), "pending": tid in c.mempool}

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
            ids = await c.submit_many(raw)
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
        timeout = body.get("timeout", 60)
        if not isinstance(timeout, int | float) or not 0 <= timeout <= MAX_WAIT_S:
            raise ApiError(400, f"timeout: expected seconds in [0, {MAX_WAIT_S:g}]")
        final = await c.wait_final(ids, float(timeout))
        return {"final": {t.hex(): h for t, h in final.items()}}

    return {
        ("GET", "/v1/ledger"): info,
        ("GET", "/v1/ledger/balance"): balance,
        ("GET", "/v1/ledger/balances"): balances,
        ("GET", "/v1/ledger/blocks"): blocks,
        ("GET", "/v1/ledger/tx"): tx_status,
        ("POST", "/v1/ledger/txs"): submit,
        ("POST", "/v1/ledger/revenue"): revenue,
        ("POST", "/v1/ledger/wait"): wait,
    }
