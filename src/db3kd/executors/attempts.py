"""`RUN_DIR/attempts.jsonl`: every attempt at a shard, with the queries it sent and whether its result was kept.

Manifests report both the queries behind the results and those spent on attempts thrown away (a worker
that died, a budget that ran out mid-shard): a query that was paid for is never lost from the record.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

ATTEMPTS_FILE = "attempts.jsonl"


class AttemptLog:
    """`RUN_DIR/attempts.jsonl`: one line per attempt at a shard (or at the reference labels), appended.

    Fields: `executor` ("driver" for the reference labels), `invocation` (one id per command run), `shard`
    (null for the reference labels),
    `attempt`, `queries` (confirmed sent), `unconfirmed` (reserved by a worker that died before saying
    whether it sent them: counted as sent), `kept`, `error`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.invocation = uuid.uuid4().hex[:12]

    def record(self, executor: str, shard: int | None, attempt: int, queries: int, kept: bool,
               unconfirmed: int = 0, error: str | None = None) -> None:
        entry = {"executor": executor, "invocation": self.invocation, "shard": shard, "attempt": attempt,
                 "queries": int(queries), "unconfirmed": int(unconfirmed), "kept": kept, "error": error}
        with open(self.path, "a") as f:  # one short write in append mode: lines never interleave
            f.write(json.dumps(entry) + "\n")

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
        return out

    def totals(self) -> dict:
        """Queries sent into this run directory as recorded, and the part of them in discarded attempts."""
        entries = self.entries()
        sent = sum(e["queries"] + e["unconfirmed"] for e in entries)
        discarded = [e for e in entries if not e["kept"]]
        return {"queries_sent": sent,
                "queries_discarded": sum(e["queries"] + e["unconfirmed"] for e in discarded),
                "queries_unconfirmed": sum(e["unconfirmed"] for e in entries),
                "attempts_discarded": len(discarded)}


def query_accounting(root: str | os.PathLike, shard_queries: list[int]) -> dict:
    """The manifest's query accounting: per shard, in the results, sent (as recorded), discarded."""
    totals = AttemptLog(Path(root) / ATTEMPTS_FILE).totals()
    return {
        "shard_queries": [int(q) for q in shard_queries],
        **totals,
        "queries_note": (
            "total_queries counts the queries behind the results: the sum of shard_queries (the attempt whose "
            "result was written, one per shard) plus any reference labelling. queries_sent counts every query "
            f"sent into this directory over all runs and workers, as recorded in {ATTEMPTS_FILE}; "
            "queries_discarded is the part spent on attempts whose results were not kept (a worker that died "
            "and was retried, a shard cut short by the budget or an error). An attempt cut short by a SIGKILL "
            "of the driver itself is not recorded."),
    }


