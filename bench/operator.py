"""Operator latency on the real kube-apiserver: apply → every child created, readiness → status Ready,
and a deleted child → recreated.

    python -m bench.operator [--pipelines 10]

The operator runs as its own process under its ServiceAccount (as in the tests).
Readiness is simulated by writing Deployment status, as the Deployment controller
would (there is no kubelet here). Times are polled every 5 ms, so they carry up to
5 ms of polling error plus one list round trip.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from promptpipe.contract.spec import STAGE_ORDER
from promptpipe.waiting import wait_until
from tests.devcluster.build import expected_tools
from tests.devcluster.cluster import ControlPlane
from tests.devcluster.keda import install_keda_crds
from tests.support.cluster import Cluster
from tests.support.operator import OperatorProcess, apply_crd, operator_kubeconfig

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "examples" / "quickstart.yaml").read_text())
CHILDREN = 1 + 3 * len(STAGE_ORDER)


def poll(check: Any, timeout: float = 30.0) -> float:
    """Seconds until check() is true."""
    start = time.perf_counter()
    wait_until(check, "convergence", timeout, every=0.005)
    return time.perf_counter() - start


def summary(name: str, seconds: list[float], target: float | None = None) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    goal = f"   target ≤ {target * 1000:.0f} ms" if target else ""
    return f"{name:<40} median {statistics.median(ms):7.1f} ms   p90 {p90:7.1f}   max {ms[-1]:7.1f}   n={len(ms)}{goal}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=10)
    parser.add_argument(
        "--concurrency", default="1,4", help="apply concurrencies to compare, one operator each, measured in turns"
    )
    args = parser.parse_args()
    tools = expected_tools()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="promptpipe-bench-") as tmp:
        folder = Path(tmp)
        plane = ControlPlane.start(tools, folder / "plane")
        operators: dict[int, OperatorProcess] = {}
        try:
            install_keda_crds(plane, tools)
            apply_crd(plane, tools)
            api = config.new_client_from_config(config_file=plane.kubeconfig)
            core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
            identity = operator_kubeconfig(plane, folder)
            for level in levels:
                ns = f"bench-c{level}"
                core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
                operators[level] = OperatorProcess(
                    identity,
                    ns,
                    folder / f"operator-{level}.log",
                    env={"PROMPTPIPE_OPERATOR_APPLY_CONCURRENCY": str(level)},
                )
                operators[level].start()

            def children(ns: str, name: str) -> int:
                selector = f"app.kubernetes.io/instance={name}"
                return (
                    len(core.list_namespaced_config_map(ns, label_selector=selector).items)
                    + len(core.list_namespaced_service(ns, label_selector=selector).items)
                    + len(apps.list_namespaced_deployment(ns, label_selector=selector).items)
                    + len(
                        custom.list_namespaced_custom_object(
                            "keda.sh", "v1alpha1", ns, "scaledobjects", label_selector=selector
                        )["items"]
                    )
                )

            def phase(ns: str, name: str) -> str:
                obj = custom.get_namespaced_custom_object("promptpipe.io", "v1alpha1", ns, "promptpipelines", name)
                return str((obj.get("status") or {}).get("phase", ""))

            created: dict[int, list[float]] = {c: [] for c in levels}
            ready: dict[int, list[float]] = {c: [] for c in levels}
            repaired: dict[int, list[float]] = {c: [] for c in levels}
            for i in range(args.pipelines):
                for level in levels:  # in turns, so both see the same machine
                    ns, name = f"bench-c{level}", f"p{i}"
                    doc = {**QUICKSTART, "metadata": {"name": name}}
                    start = time.perf_counter()
                    custom.create_namespaced_custom_object("promptpipe.io", "v1alpha1", ns, "promptpipelines", doc)
                    created[level].append(time.perf_counter() - start + poll(lambda: children(ns, name) == CHILDREN))
                    poll(lambda: phase(ns, name) == "Progressing")
                    start = time.perf_counter()
                    for stage in STAGE_ORDER:
                        Cluster(api, ns).set_ready(f"{name}-{stage.value}")
                    ready[level].append(time.perf_counter() - start + poll(lambda: phase(ns, name) == "Ready"))
                    start = time.perf_counter()
                    core.delete_namespaced_service(f"{name}-rag", ns)
                    repaired[level].append(time.perf_counter() - start + poll(lambda: children(ns, name) == CHILDREN))

            print(
                f"operator as its ServiceAccount, {args.pipelines} quickstart pipelines ({CHILDREN} children each) "
                f"per setting, applied one after another, settings in turns"
            )
            for level in levels:
                op = operators[level]
                reconciles = op.metric("promptpipe_operator_reconcile_duration_seconds_count")
                spent = op.metric("promptpipe_operator_reconcile_duration_seconds_sum")
                print(f"-- apply concurrency {level}")
                print(summary("apply → all children created", created[level], 2.0))
                print(summary("last stage ready → status Ready", ready[level], 2.0))
                print(summary("Service deleted → recreated", repaired[level]))
                print(f"{'reconciles':<40} {reconciles:.0f} in all, mean {1000 * spent / max(reconciles, 1):.1f} ms")
            if len(levels) == 2:
                a, b = levels
                print(
                    f"-- median ratio, concurrency {b} / {a}: apply→created "
                    f"{statistics.median(created[b]) / statistics.median(created[a]):.2f}, ready→Ready "
                    f"{statistics.median(ready[b]) / statistics.median(ready[a]):.2f}"
                )
        finally:
            for op in operators.values():
                op.stop()
            plane.stop()


if __name__ == "__main__":
    main()
