#!/usr/bin/env bash
# Set up (if needed) and run the demo: a local testnet of a bootstrap node and 3 nodes on
# 127.0.0.1 (with simulated GPUs of various sizes), queried through the CLI; then a model
# and a dataset shared through SMIP (published on node-1, fetched on node-2 and node-3 at
# once, compared byte for byte, loaded); then a training job of the tiny GPT on the
# stdlib corpus runs on the testnet (loss per round, receipts); its receipts and round
# records become final on the testnet's chain, the balances they earned are shown, one
# node's stored chain is replayed from genesis, a revenue record for the final model is
# split along its lineage; then the testnet is stopped and its directory (a few hundred
# MB: homes, stores, logs) removed.
#
#   bash scripts/demo.sh [--keep]     --keep: leave the directory for a look afterwards
#   IOLLM_DEMO_DIR=DIR                run in DIR (kept: it is yours), not a fresh temp dir
#   IOLLM_DEMO_NODES=N                nodes besides the bootstrap node (default and least: 3)
keep=0
for arg in "$@"; do
    case "$arg" in
        --keep) keep=1 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo.sh: unknown argument $arg (--keep, --help)" >&2; exit 2 ;;
    esac
done
source "$(dirname "$0")/setup.sh"
[ -n "${IOLLM_DEMO_DIR:-}" ] && keep=1
dir=${IOLLM_DEMO_DIR:-$(mktemp -d -t iollm-demo.XXXXXX)}
nodes=${IOLLM_DEMO_NODES:-3}
finish() {
    iollm testnet down --dir "$dir" || true
    if [ "$keep" = 1 ]; then
        echo "== the demo's files are kept in $dir (remove them with: rm -rf $dir)"
    else
        size=$(du -sh "$dir" 2>/dev/null | cut -f1)
        rm -rf "$dir"
        echo "== removed the demo's directory $dir (${size:-?}; --keep keeps it)"
    fi
}
trap finish EXIT
echo "== iollm testnet up --nodes $nodes --simulate-gpus --dir $dir"
iollm testnet up --nodes "$nodes" --simulate-gpus --dir "$dir"
echo
echo "== iollm env (this machine, as the probe sees it)"
iollm env --bench-seconds 0.3
echo
echo "== iollm gpus, asked on node-2: every node's verified capability record, from the DHT"
iollm gpus --home "$dir/node-2"
echo
echo "== iollm gpus --min-vram 24, asked on node-3: one provider lookup, exact filter"
iollm gpus --min-vram 24 --home "$dir/node-3"
echo
echo "== iollm peers, asked on the bootstrap node"
iollm peers --home "$dir/bootstrap"
echo
echo "== the local API refuses a request without the bearer token:"
api=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['api'])" "$dir/bootstrap/node.json")
curl -s -w "  (HTTP %{http_code})\n" "$api/v1/status" || true
echo
echo "== SMIP: share a model and a dataset"
work="$dir/files"
python scripts/make_demo_data.py model "$work/tiny-gpt" --mib 20 --shards 2
python scripts/make_demo_data.py dataset "$work/stdlib-corpus.txt"
echo "made $work/tiny-gpt ($(du -sh "$work/tiny-gpt" | cut -f1): config.json and 2 safetensors shards)"
echo "made $work/stdlib-corpus.txt ($(du -sh "$work/stdlib-corpus.txt" | cut -f1) of standard-library source)"
echo
echo "== iollm model publish, on node-1"
model=$(iollm model publish "$work/tiny-gpt" --name tiny-gpt --home "$dir/node-1")
echo "== iollm dataset publish, on node-1"
dataset=$(iollm dataset publish "$work/stdlib-corpus.txt" --home "$dir/node-1")
echo
wait_listed() {  # KIND NODE VERSION: until NODE knows VERSION (by gossip), at most 20 s
    for _ in $(seq 1 40); do
        grep -q "$3" <<<"$(iollm "$1" list --json --home "$dir/$2")" && return 0
        sleep 0.5
    done
    echo "$2 has not heard of $1 $3 after 20 s" >&2
    return 1
}
echo "== iollm model list, asked on node-2 (once the announcement has arrived by gossip)"
for n in 2 3; do
    wait_listed model "node-$n" "$model"
    wait_listed dataset "node-$n" "$dataset"
done
iollm model list --home "$dir/node-2"
echo
echo "== iollm model fetch and dataset fetch on node-2 and node-3, all four at once"
echo "   (ids given by a prefix; progress lines in logs, shown below)"
pids=()
for n in 2 3; do
    iollm model fetch "${model:0:12}" --out "$work/node-$n/tiny-gpt" --home "$dir/node-$n" \
        >"$work/fetch-model-$n.log" 2>&1 &
    pids+=($!)
    iollm dataset fetch "${dataset:0:12}" --out "$work/node-$n/corpus" --home "$dir/node-$n" \
        >"$work/fetch-dataset-$n.log" 2>&1 &
    pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
for n in 2 3; do
    for what in model dataset; do
        echo "-- $what fetch on node-$n:"
        sed 's/^/   /' "$work/fetch-$what-$n.log"
    done
done
[ "$failed" = 0 ] || { echo "a fetch failed" >&2; exit 1; }
echo
echo "== the fetched files are byte for byte the published ones:"
for n in 2 3; do
    for f in config.json model-00001-of-00002.safetensors model-00002-of-00002.safetensors; do
        cmp "$work/tiny-gpt/$f" "$work/node-$n/tiny-gpt/$f"
    done
    cmp "$work/stdlib-corpus.txt" "$work/node-$n/corpus/stdlib-corpus.txt"
    echo "  node-$n: identical (cmp)"
done
echo
echo "== the fetched model loads with safetensors on node-3's side:"
python - "$work/node-3/tiny-gpt" <<'PY'
import json, sys
from pathlib import Path
from safetensors.numpy import load_file
d = Path(sys.argv[1])
tensors = {}
for shard in sorted(d.glob("*.safetensors")):
    tensors.update(load_file(str(shard)))
config = json.loads((d / "config.json").read_text())
params = sum(t.size for t in tensors.values())
print(f"  {len(tensors)} tensors, {params:,} parameters, config {config['architecture']}, "
      f"first tensor {next(iter(tensors))} {tensors[next(iter(tensors))].shape}")
PY
echo
echo "== a child version changing one of the two shards, published on node-2, then shown"
python scripts/make_demo_data.py model "$work/tiny-gpt-v2" --mib 20 --shards 2 --bump 1
child=$(iollm model publish "$work/tiny-gpt-v2" --name tiny-gpt-v2 --parent "${model:0:12}" \
        --home "$dir/node-2")
iollm model show "${child:0:12}" --home "$dir/node-2"
echo
echo "== iollm dataset list, asked on node-3"
iollm dataset list --home "$dir/node-3"
echo
echo "== training: the built-in tiny GPT and the standard-library corpus, published on node-1"
base=$(iollm model init --size tiny --name gpt-tiny --home "$dir/node-1")
corpus=$(iollm dataset stdlib --home "$dir/node-1")
sed -e "s/^base_model = .*/base_model = \"$base\"/" -e "s/^dataset = .*/dataset = \"$corpus\"/" \
    bootstrap/jobs/demo.toml >"$work/job.toml"
echo "== iollm job submit on node-1 (node-1 coordinates; the other nodes train)"
job=$(iollm job submit "$work/job.toml" --home "$dir/node-1")
echo "== iollm job status --watch: the held-out loss per round, each task's worker and verdict"
iollm job status "${job:0:12}" --watch --home "$dir/node-1" --timeout 30
echo
echo "== iollm receipts, on node-1 (issued as coordinator) and node-2 (earned as a worker)"
iollm receipts --job "${job:0:12}" --home "$dir/node-1"
iollm receipts --home "$dir/node-2"
echo
echo "== the chain: node-1 recorded the job, each receipt and a round record per round as"
echo "   ledger transactions; the 4 validators (bootstrap, node-1..3) finalize them in blocks"
echo "== iollm ledger wait --job, on node-1: until every one of them is final"
iollm ledger wait --job "${job:0:12}" --timeout 120 --home "$dir/node-1"
names() {  # which node is which peer id, for the balance listings
    python - "$dir/testnet.json" <<'PY'
import json, sys
for n in json.load(open(sys.argv[1]))["nodes"]:
    print(f"  {n['peer_id']}  {n['name']}")
PY
}
echo
echo "== iollm ledger balance --all, asked on node-2: what the job earned (mining emission"
echo "   per block of receipts and a breakthrough reward per round that set the best"
echo "   held-out loss, split by tokens x quality; the designer, node-1, takes 20% first)"
iollm ledger balance --all --home "$dir/node-2"
echo "  where:"
names
echo
echo "== iollm ledger blocks --limit 5, asked on node-3"
iollm ledger blocks --limit 5 --home "$dir/node-3"
echo
echo "== iollm ledger verify --home node-3: replay its stored chain from genesis, here"
iollm ledger verify --home "$dir/node-3"
echo
final=$(iollm job status "${job:0:12}" --json --home "$dir/node-1" |
        python -c "import json,sys; print(json.load(sys.stdin)['base'])")
before=$(iollm ledger balance --all --json --home "$dir/node-1")
echo "== iollm revenue record ${final:0:12} 1000 --wait, on node-1: the final model earned"
echo "   1000 units; they are split along its lineage (the designer's 20% first, the rest"
echo "   over every receipt of its 3 rounds by weight)"
iollm revenue record "${final:0:12}" 1000 --memo "demo: first sale" --wait --home "$dir/node-1"
iollm ledger balance --all --home "$dir/node-1"
echo "  what the revenue paid each:"
python - "$dir/testnet.json" "$before" "$(iollm ledger balance --all --json --home "$dir/node-1")" <<'PY'
import json, sys
names = {n["peer_id"]: n["name"] for n in json.load(open(sys.argv[1]))["nodes"]}
before = {r["peer"]: r["balance"] for r in json.loads(sys.argv[2])}
after = {r["peer"]: r["balance"] for r in json.loads(sys.argv[3])}
for peer in sorted(after, key=lambda p: names.get(p, p)):
    print(f"  {names.get(peer, peer):<10} +{after[peer] - before.get(peer, 0)}")
print(f"  total      +{sum(after.values()) - sum(before.values())}")
PY
