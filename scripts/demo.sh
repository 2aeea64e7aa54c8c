#!/usr/bin/env bash
# Set up (if needed) and run the demo: a local testnet of a bootstrap node and 3 nodes on
# 127.0.0.1 (with simulated GPUs of various sizes), queried through the CLI, then stopped.
source "$(dirname "$0")/setup.sh"
dir=${IOLLM_DEMO_DIR:-$(mktemp -d -t iollm-demo.XXXXXX)}
trap 'iollm testnet down --dir "$dir" || true' EXIT
echo "== iollm testnet up --nodes 3 --simulate-gpus --dir $dir"
iollm testnet up --nodes 3 --simulate-gpus --dir "$dir"
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
