"""Blue-green latency on the real kube-apiserver: green Ready → inference Service on green, and a
rollback decision (the request reaching the operator) → Service back on blue.

    python -m bench.rollout [--rounds 8]

The registry is moto's server over HTTP; the smoke generation goes to a TGI-protocol server; readiness
is written as the Deployment controller would. Each round: v(n) on blue → v(n+1) green → switch →
manual rollback (an annotation, as `promptpipe rollback` writes it). Polled every 5 ms.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

from kubernetes import client, config

from bench.operator import QUICKSTART, poll, summary
from promptpipe.registry.settings import RegistrySettings
from promptpipe.registry.store import Registry
from tests.devcluster.build import expected_tools
from tests.devcluster.cluster import ControlPlane
from tests.devcluster.keda import install_keda_crds
from tests.support.cluster import Cluster
from tests.support.moto import CREDENTIALS, make_model, moto_server, registry_env
from tests.support.operator import OperatorProcess, apply_crd, operator_kubeconfig
from tests.support.pipelines import tgi_server

NS, NAME = "bench-rollout", "bg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    tools = expected_tools()
    with tempfile.TemporaryDirectory(prefix="promptpipe-bench-") as tmp, moto_server() as moto, tgi_server() as tgi:
        folder = Path(tmp)
        settings = RegistrySettings(bucket="bench", table="bench", endpoint_url=moto, region="us-east-1")
        registry = Registry(settings)
        registry.init()
        for v in range(args.rounds + 1):
            registry.push("m", make_model(folder / f"v{v}", str(v)), f"v{v}")
        plane = ControlPlane.start(tools, folder / "plane")
        op: OperatorProcess | None = None
        try:
            install_keda_crds(plane, tools)
            apply_crd(plane, tools)
            api = config.new_client_from_config(config_file=plane.kubeconfig)
            core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
            op = OperatorProcess(
                operator_kubeconfig(plane, folder),
                NS,
                folder / "operator.log",
                env={
                    **registry_env(settings),
                    "PROMPTPIPE_OPERATOR_BACKEND_URL_TEMPLATE": f"{tgi}/{{namespace}}/{{service}}",
                },
            )
            op.start()

            def traffic() -> str:
                return str(core.read_namespaced_service(f"{NAME}-backend", NS).spec.selector["promptpipe.io/color"])

            ready = Cluster(api, NS).set_ready

            def exists(deployment: str, version: str) -> bool:
                try:
                    d = apps.read_namespaced_deployment(deployment, NS)
                except client.ApiException:
                    return False
                return bool(d.metadata.annotations.get("promptpipe.io/model-version") == version)

            def apply(version: str) -> None:
                doc = copy.deepcopy(QUICKSTART)
                doc["metadata"] = {"name": NAME}
                doc["spec"]["model"] = {"name": "m", "version": version, "backend": "tgi", "tgi": {"gpus": 1}}
                doc["spec"]["rollout"] = {"analysis": {"window": 600}}
                try:
                    custom.create_namespaced_custom_object("promptpipe.io", "v1alpha1", NS, "promptpipelines", doc)
                except client.ApiException:
                    custom.patch_namespaced_custom_object(
                        "promptpipe.io", "v1alpha1", NS, "promptpipelines", NAME, {"spec": doc["spec"]}
                    )

            switch, back = [], []
            apply("v0")
            poll(lambda: exists(f"{NAME}-backend-blue", "v0"))
            ready(f"{NAME}-backend-blue")
            for v in range(1, args.rounds + 1):
                active = traffic()
                green = "green" if active == "blue" else "blue"
                apply(f"v{v}")
                poll(lambda: exists(f"{NAME}-backend-{green}", f"v{v}"))
                start = time.perf_counter()
                ready(f"{NAME}-backend-{green}")
                switch.append(time.perf_counter() - start + poll(lambda: traffic() == green))
                start = time.perf_counter()
                custom.patch_namespaced_custom_object(
                    "promptpipe.io",
                    "v1alpha1",
                    NS,
                    "promptpipelines",
                    NAME,
                    {"metadata": {"annotations": {"promptpipe.io/rollback": f"r{v}"}}},
                )
                back.append(time.perf_counter() - start + poll(lambda: traffic() == active))
                # Next round starts from the rolled-back version on `active`; the next version gets the other color.
            print(f"operator as its ServiceAccount, {args.rounds} rollouts, smoke test through a TGI-protocol server")
            print(summary("green Ready → Service on green", switch, 2.0))
            print(summary("rollback requested → Service on blue", back, 2.0))
        finally:
            if op is not None:
                op.stop()
            plane.stop()


if __name__ == "__main__":
    main()
