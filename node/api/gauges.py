"""What the services hold now, as Prometheus metrics read at each scrape of ``/metrics``:
the chain's height and mempool, this node's balance, the jobs it coordinates and the
tasks it trains. A collector rather than gauges set along the way: the services keep
these numbers already, and a scrape reads them in microseconds.

The names are listed, with every other metric of the node, in README.md (Monitoring).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node.chain.service import Chain
from node.jobs.coordinator import Jobs
from node.jobs.worker import Worker

__all__ = ["ServiceCollector", "register_service_metrics"]


class ServiceCollector(Collector):
    def __init__(self, chain: Chain | None, jobs: Jobs | None, worker: Worker | None) -> None:
        self.chain, self.jobs, self.worker = chain, jobs, worker

    def collect(self) -> Iterator[Metric]:
        if self.chain is not None:
            led = self.chain.ledger
            yield GaugeMetricFamily("iollm_chain_height", "height of the last final block",
                                    value=led.height)
            yield GaugeMetricFamily("iollm_chain_mempool_txs", "transactions waiting for a block",
                                    value=len(self.chain.mempool))
            yield GaugeMetricFamily("iollm_chain_supply_units", "units in all balances",
                                    value=led.supply)
            yield GaugeMetricFamily("iollm_balance_units", "this node's balance",
                                    value=led.balance(self.chain.peer_id))
        if self.jobs is not None:
            by_status = GaugeMetricFamily("iollm_jobs", "jobs known here, by status",
                                          labels=["status"])
            counts: dict[str, int] = {}
            for job in self.jobs.list():
                counts[job["status"]] = counts.get(job["status"], 0) + 1
            for status in ("running", "done", "failed", "elsewhere"):
                by_status.add_metric([status], counts.get(status, 0))
            yield by_status
        if self.worker is not None:
            yield GaugeMetricFamily("iollm_worker_tasks_running", "tasks training here now",
                                    value=self.worker.busy)
            stats = self.worker.stats
            tasks = CounterMetricFamily("iollm_worker_tasks",
                                        "tasks offered to this worker, by outcome",
                                        labels=["outcome"])
            for outcome in ("accepted", "refused", "finished", "failed"):
                tasks.add_metric([outcome], getattr(stats, outcome))
            yield tasks
            yield CounterMetricFamily("iollm_worker_train_seconds",
                                      "wall time of the training child processes",
                                      value=stats.train_s)


def register_service_metrics(registry: CollectorRegistry, *, chain: Chain | None = None,
                             jobs: Jobs | None = None, worker: Worker | None = None) -> None:
    registry.register(ServiceCollector(chain, jobs, worker))
