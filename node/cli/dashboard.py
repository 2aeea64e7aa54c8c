"""``iollm dashboard``: a one-time login link to the node's web dashboard.

The node serves the dashboard on its local API address (node/api/dashboard.py); this
command asks it, with the API token, for a login code and prints the link (or opens it in
the browser with ``--open``). The link works once, for a few minutes: opening it sets
the browser's session cookie, so the token itself never reaches the browser.
"""

from __future__ import annotations

import argparse
import json

from node.cli.common import CliError, call_node, home_of
from node.config import RUNTIME_FILE


def cmd_dashboard(args: argparse.Namespace) -> int:
    answer = call_node(args, "/v1/dashboard/login", "POST", {})
    try:
        base = json.loads((home_of(args) / RUNTIME_FILE).read_text())["api"]
    except (OSError, ValueError, KeyError):
        raise CliError("the node stopped while the login link was made") from None
    url = f"{base}{answer['path']}"
    if args.json:
        print(json.dumps({"url": url, "expires_s": answer["expires_s"]}))
        return 0
    print(url)
    minutes = answer["expires_s"] // 60
    if args.open:
        import webbrowser

        if webbrowser.open(url):
            print(f"opened in your browser (the link works once, for {minutes} minutes)")
            return 0
        print("no browser found here: open the link above yourself")
    print(f"open it in a browser on this machine; it works once, for {minutes} minutes",
          flush=True)
    return 0


def add_dashboard_command(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                          client: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "dashboard", parents=[client], help="a login link to the node's web dashboard",
        description="Print a one-time link that logs a browser on this machine into the "
                    "running node's dashboard (node, network, models, jobs, chain; live). "
                    "The link works once, for 5 minutes; run this again for another. "
                    "The dashboard listens on 127.0.0.1 only: from another machine, forward "
                    "the port (ssh -L PORT:127.0.0.1:PORT host) and open the link there.")
    p.add_argument("--open", action="store_true", help="open the link in the default browser")
    p.set_defaults(func=cmd_dashboard)
