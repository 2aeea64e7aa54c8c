"""What a new user reads from ``iollm`` (issue 20): error lines, the job progress view,
the model list, simulated GPUs. Pure formatting, no node; the e2e tests run the same
code against a testnet."""

from __future__ import annotations

from pathlib import Path

from node.api.client import ApiClientError
from node.cli.common import explain_api_error


def test_api_errors_say_what_is_wrong_not_the_transport() -> None:
    home = Path("/h")
    said = explain_api_error(ApiClientError(400, "train.rounds: expected an integer >= 1"),
                             home, "/v1/jobs/submit")
    assert said == "train.rounds: expected an integer >= 1"
    token = explain_api_error(ApiClientError(401, "missing or bad bearer token"), home,
                              "/v1/status")
    assert "/h/api.token" in token and "HTTP" not in token
    old = explain_api_error(ApiClientError(404, "no such path: /v1/new"), home, "/v1/new?x=1")
    assert old == "the running node has no /v1/new: it runs an older iollm than this command"
    missing = explain_api_error(ApiClientError(404, "no version abcdef12 known"), home,
                                "/v1/models/show")
    assert missing == "no version abcdef12 known"
    bug = explain_api_error(ApiClientError(500, "internal error"), home, "/v1/peers")
    assert "log has the traceback" in bug
    for status in (400, 404, 409, 503):
        assert "HTTP" not in str(ApiClientError(status, "x"))
