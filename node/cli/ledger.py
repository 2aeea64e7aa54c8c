"""``iollm ledger ...`` and ``iollm revenue record``.

    ledger status           GET /v1/ledger
    ledger balance [PEER]   GET /v1/ledger/balance (--all: every account)
    ledger blocks           GET /v1/ledger/blocks?limit=
    ledger wait --job JOB   GET /v1/jobs/status, then POST /v1/ledger/records: until the
                            job, its receipts and its round records are final
    ledger verify           replays the home's stored chain from genesis, here, without the
                            node: every certificate, every signature, every state root
    revenue record M AMT    POST /v1/ledger/revenue (--wait: until a final block holds it)

``ledger verify`` reads the node's database read-only (SQLite WAL lets it run beside the
daemon) and trusts nothing in it: a tampered block, certificate or snapshot fails it.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from node.cli.common import CliError, call_node, home_of, int_arg, named, short_peer, when
from node.config import RUNTIME_FILE, STATE_DB

VERIFY_PROGRESS_EVERY = 200  # blocks between progress lines on stderr


def cmd_ledger_balance(args: argparse.Namespace) -> int:
    if args.all:
        rows = call_node(args, "/v1/ledger/balances")
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        width = max((len(r.get("name") or "") for r in rows), default=0)
        for r in rows:
            print(f"{r['balance']:>16}  {r['peer']}  {named(r, width)}".rstrip())
        info = call_node(args, "/v1/ledger")
        t = info["totals"]
        print(f"{sum(r['balance'] for r in rows):>16}  total of {len(rows)} accounts at height "
              f"{info['height']} (supply {t['supply']}: allocated {t['allocated']}, emitted "
              f"{t['emitted']}, revenue {t['revenue']}; {t['receipts']} receipts counted)")
        return 0
    path = "/v1/ledger/balance" + (f"?peer={quote(args.peer)}" if args.peer else "")
    b = call_node(args, path)
    if args.json:
        print(json.dumps(b, indent=2))
        return 0
    print(f"{b['balance']}  {b['peer']}  {named(b)}(height {b['height']})")
    return 0


def cmd_ledger_status(args: argparse.Namespace) -> int:
    info = call_node(args, "/v1/ledger")
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    t = info["totals"]
    print(f"chain {info['chain_id']}  genesis {info['genesis'][:16]}  "
          f"({'validator' if info['validator'] else 'follower'})")
    print(f"height {info['height']}  block {info['block'][:16]}  state root "
          f"{info['state_root'][:16]}  mempool {info['mempool']} txs")
    print(f"supply {t['supply']} (allocated {t['allocated']}, emitted {t['emitted']}, "
          f"revenue {t['revenue']}); {t['receipts']} receipts counted")
    for v in info["validators"]:
        print(f"  validator {v['peer']}  power {v['power']}")
    return 0


def cmd_ledger_blocks(args: argparse.Namespace) -> int:
    rows = call_node(args, f"/v1/ledger/blocks?limit={args.limit}")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no final block yet")
    for b in rows:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(b["kinds"].items())) or "empty"
        print(f"{b['height']:>7}  {b['id'][:16]}  {when(b['time_ms'])}  proposer "
              f"{short_peer(b['proposer'])}  {b['txs']} txs ({kinds})  round "
              f"{b['commit_round']}, {b['signatures']} signatures")
    return 0


def cmd_ledger_wait(args: argparse.Namespace) -> int:
    status = call_node(args, f"/v1/jobs/status?id={quote(args.job)}")
    jid = status["job"]
    if not status.get("coordinated_here"):
        raise CliError(f"job {jid[:16]} is coordinated by {status['coordinator']}, not this "
                       f"node: ask with the coordinator's --home (it knows the job's receipts)")
    rounds = status.get("rounds") or []
    receipts = [r for rnd in rounds for r in rnd.get("receipts") or []]
    versions = [rnd["version"] for rnd in rounds if rnd.get("version")]
    answer = call_node(args, "/v1/ledger/records", "POST",
                       {"job": jid, "receipts": receipts, "versions": versions,
                        "timeout": args.timeout * 0.9})
    job = answer["job"]
    done = (job is not None and len(answer["receipts"]) == len(set(receipts))
            and len(answer["versions"]) == len(set(versions)))
    if args.json:
        print(json.dumps({**answer, "final": done, "job_status": status["status"]}, indent=2))
    else:
        where = f"registered in block {job['height']}" if job else "not on the chain yet"
        print(f"job {jid[:16]} {where}; {len(answer['receipts'])} of {len(set(receipts))} "
              f"receipts and {len(answer['versions'])} of {len(set(versions))} round records "
              f"final (height {answer['height']})")
        if status["status"] == "running":
            print(f"the job is still running (round {status['round']}): only the rounds it "
                  f"finished so far are counted here", file=sys.stderr)
    if not done:
        raise CliError(f"job {jid[:16]}: not all of its records final within "
                       f"{args.timeout:g} s (`iollm ledger blocks` shows the chain)")
    return 0


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    # The only ledger command that needs the chain's code (it replays here); the others
    # only talk to the node, and importing this costs them ~0.8 s (node/api/client.py).
    from node.api.ledger import ledger_totals
    from node.chain.service import GENESIS_FILE, ChainError, load_genesis
    from protocol.consensus import verify_commit
    from protocol.errors import ProtocolError
    from protocol.ledger import Block, Ledger, block_id, check_tx

    home = home_of(args)
    try:
        genesis = load_genesis(home, None)
    except ChainError as exc:
        raise CliError(str(exc)) from None
    if genesis is None:
        raise CliError(f"{home} follows no chain (no {GENESIS_FILE}): start the node with "
                       f"--genesis FILE first")
    db = home / STATE_DB
    if not db.exists():
        raise CliError(f"no node database at {db}")
    ledger = Ledger.from_genesis(genesis)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        cursor = conn.execute("SELECT height, block, commit_ FROM blocks ORDER BY height")
        for height, data, commit in cursor:
            data, commit = bytes(data), bytes(commit)
            try:
                block = Block.decode(data, genesis.max_block_bytes)
                if block.height != height or height != ledger.height + 1:
                    raise CliError(f"block {height}: stored out of order (holds height "
                                   f"{block.height} after {ledger.height})")
                verify_commit(genesis.chain_id, genesis.powers, height, block_id(data), commit)
                ledger = ledger.apply_block(block, [check_tx(genesis, t) for t in block.txs])
            except ProtocolError as exc:
                raise CliError(f"block {height} does not verify: {exc}") from None
            if height % VERIFY_PROGRESS_EVERY == 0:
                print(f"verified {height} blocks", file=sys.stderr)
    except sqlite3.Error as exc:
        raise CliError(f"cannot read {db}: {exc}") from None
    finally:
        conn.close()
    result: dict[str, Any] = {"chain_id": genesis.chain_id, "height": ledger.height,
                              "state_root": ledger.state_root().hex(),
                              "block": ledger.last_block_id.hex(), "totals": ledger_totals(ledger)}
    live = _live_root(args, home)
    if live is not None:
        result["node"] = live
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"chain {genesis.chain_id}: {ledger.height} blocks verified (every certificate "
              f"and signature)")
        print(f"height {ledger.height}  state root {result['state_root']}")
        if live is not None:
            print(f"the running node is at height {live['height']}, state root "
                  f"{live['state_root']}" + ("  (same)" if live["height"] == ledger.height
                                             and live["state_root"] == result["state_root"]
                                             else ""))
    if live is not None and live["height"] == ledger.height \
            and live["state_root"] != result["state_root"]:
        raise CliError("the running node's state root differs from the replayed one")
    return 0


def _live_root(args: argparse.Namespace, home: Path) -> dict[str, Any] | None:
    """The running node's height and root, when it runs (else None)."""
    if not (home / RUNTIME_FILE).exists():
        return None
    try:
        info = call_node(args, "/v1/ledger")
    except CliError:
        return None
    return {"height": info["height"], "state_root": info["state_root"]}


def cmd_revenue_record(args: argparse.Namespace) -> int:
    answer = call_node(args, "/v1/ledger/revenue", "POST",
                       {"model": args.model, "amount": args.amount, "memo": args.memo})
    print(f"revenue of {args.amount} for {args.model} submitted: tx {answer['tx']} "
          f"(nonce {answer['nonce']})", file=sys.stderr)
    if args.wait:
        final = call_node(args, "/v1/ledger/wait", "POST",
                          {"txs": [answer["tx"]], "timeout": args.timeout * 0.9})["final"]
        if answer["tx"] not in final:
            raise CliError(f"tx {answer['tx'][:16]} not final within {args.timeout:g} s "
                           f"(`iollm ledger blocks` shows the chain)")
        print(f"final in block {final[answer['tx']]}", file=sys.stderr)
    print(json.dumps(answer) if args.json else answer["tx"])
    return 0


_amount = int_arg(1, 2**63 - 1, "a whole number of units >= 1")
_limit = int_arg(1, 1000, "a count in 1..1000")


def add_ledger_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                        home: argparse.ArgumentParser, client: argparse.ArgumentParser) -> None:
    group = sub.add_parser(
        "ledger", help="the chain's blocks and the reward ledger",
        description="The testnet's validators agree on blocks of ledger transactions "
                    "(receipts, round records, revenue, evidence); every node replays them "
                    "to the same balances (specs/consensus.md, specs/rewards.md).")
    actions = group.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    p = actions.add_parser("status", parents=[client], help="the chain this node follows",
                           description="Chain id, height, last block, state root, supply, "
                                       "validators and the mempool of the running node.")
    p.set_defaults(func=cmd_ledger_status)
    p = actions.add_parser("balance", parents=[client], help="a peer's balance",
                           description="The balance of PEER (default: this node) in the "
                                       "ledger after the last final block.")
    p.add_argument("peer", nargs="?", metavar="PEER", help="peer id (default: this node)")
    p.add_argument("--all", action="store_true", help="every account, largest first")
    p.set_defaults(func=cmd_ledger_balance)
    p = actions.add_parser("blocks", parents=[client], help="the latest final blocks",
                           description="Final blocks, newest first: height, id, time, "
                                       "proposer, transactions and the commit certificate.")
    p.add_argument("--limit", type=_limit, default=20, metavar="N",
                   help="how many (1..1000, default 20)")
    p.set_defaults(func=cmd_ledger_blocks)
    p = actions.add_parser(
        "wait", parents=[client], help="wait until a job's records are final",
        description="Wait until the job JOB (coordinated by this node), every receipt it "
                    "issued and every round record it made are in final blocks; exit 1 "
                    "when --timeout passes first. A running job's finished rounds only.")
    p.add_argument("--job", required=True, metavar="JOB", help="job id or unique prefix")
    p.set_defaults(func=cmd_ledger_wait)
    p = actions.add_parser(
        "verify", parents=[home], help="replay the stored chain from genesis",
        description="Replay every block this node stored, from its genesis, checking each "
                    "commit certificate, every transaction signature and every state root; "
                    "print the height and state root reached. Runs here, without the node; "
                    "if the node runs, its root is compared. Exit 1 on any mismatch.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="seconds to wait for the running node's answer (default 60)")
    p.set_defaults(func=cmd_ledger_verify)

    group = sub.add_parser("revenue", help="record revenue a model earned",
                           description="Long-term profit share (specs/rewards.md).")
    actions = group.add_subparsers(dest="revenue_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "record", parents=[client], help="record revenue of a model version",
        description="Sign a revenue record for MODEL (a version id or unique prefix) and "
                    "submit it; once final, AMOUNT is split along the model's lineage by "
                    "recorded contribution, the designer's share first. Prints the tx id.")
    p.add_argument("model", metavar="MODEL", help="model version id or unique prefix")
    p.add_argument("amount", metavar="AMOUNT", type=_amount, help="whole units, >= 1")
    p.add_argument("--memo", default="", help="a short note kept with the record")
    p.add_argument("--wait", action="store_true", help="wait until a final block holds it")
    p.set_defaults(func=cmd_revenue_record)
