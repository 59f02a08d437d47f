"""The parts of a kubelet the tests need, since none runs here: a container's environment as the kubelet
would build it from the API server (env, envFrom, Secrets, ConfigMaps, the downward API), and a pod's
containers run as local processes with their status written back."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from promptpipe.contract.timestamps import format_time
from promptpipe.localproc import die_with_parent, free_port
from promptpipe.waiting import wait_until
from tests.support.kube import replica_set_owning

Container = dict[str, Any]  # as in a Pod spec, camelCase keys


def _secret(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, str]:
    data = core.read_namespaced_secret(name, namespace).data or {}
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


def _config_map(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, str]:
    return dict(core.read_namespaced_config_map(name, namespace).data or {})


def _field(path: str, namespace: str, pod_name: str) -> str:
    fields = {"metadata.namespace": namespace, "metadata.name": pod_name}
    if path not in fields:
        raise NotImplementedError(f"fieldRef {path}")
    return fields[path]


def container_env(core: client.CoreV1Api, namespace: str, container: Container, pod_name: str = "") -> dict[str, str]:
    """envFrom first, then env on top (the kubelet's precedence). `$(VAR)` expansion is not done."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            values = _secret(core, namespace, source["secretRef"]["name"])
        else:
            values = _config_map(core, namespace, source["configMapRef"]["name"])
        env |= {prefix + k: v for k, v in values.items()}
    for var in container.get("env") or []:
        if "valueFrom" not in var:  # the API server omits an empty value
            env[var["name"]] = var.get("value", "")
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            env[var["name"]] = _field(ref["fieldRef"]["fieldPath"], namespace, pod_name)
        elif "secretKeyRef" in ref:
            key = ref["secretKeyRef"]
            values = _secret(core, namespace, key["name"])
            if key["key"] in values or not key.get("optional"):  # an optional key that is absent: no variable
                env[var["name"]] = values[key["key"]]
        else:
            key = ref["configMapKeyRef"]
            env[var["name"]] = _config_map(core, namespace, key["name"])[key["key"]]
    return env


TERMINATION_MESSAGE_BYTES = 2048  # what a kubelet keeps of a log's tail with FallbackToLogsOnError
# A stand-in for an image the machine cannot run: (container, its volumes on the host, a free port) → argv.
Runtime = Callable[[Container, Callable[[str], str], int], list[str]]


@dataclass
class RunningPod:
    name: str
    volumes: dict[str, Path]  # volume name → its folder on this machine
    process: subprocess.Popen[bytes] | None = None
    url: str = ""  # the main container's first port, on loopback

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@dataclass
class Kubelet:
    """Runs the pods of a Deployment as a kubelet would, with what this machine has: the Pod is created in
    the API server from the Deployment's template (the ReplicaSet controller's job), init containers run
    in order as local processes with the environment the API server gives them, each must exit 0, then
    the main container starts and is Ready once its readiness probe answers; every step is written to
    the Pod's status. Volumes are host folders: a path under a volumeMount in a command is rewritten to
    the volume's folder. Images are not pulled: a `promptpipe …` command runs this checkout's entry
    point; other images need a `runtimes` stand-in."""

    core: client.CoreV1Api
    apps: client.AppsV1Api
    namespace: str
    root: Path
    runtimes: dict[str, Runtime] = field(default_factory=dict)  # image without its tag → stand-in
    pods: list[RunningPod] = field(default_factory=list)

    def run(self, deployment: str, timeout: float = 60.0) -> RunningPod:
        template = client.ApiClient().sanitize_for_serialization(
            self.apps.read_namespaced_deployment(deployment, self.namespace).spec.template
        )
        suffix = uuid.uuid4().hex[:5]
        name = f"{deployment}-{suffix}"
        owners = replica_set_owning(self.apps, self.namespace, deployment, suffix)
        metadata = {**template["metadata"], "name": name, "ownerReferences": owners}
        self.core.create_namespaced_pod(self.namespace, {"metadata": metadata, "spec": template["spec"]})
        spec = template["spec"]
        pod = RunningPod(name, {v["name"]: self.root / name / v["name"] for v in spec.get("volumes") or []})
        for folder in pod.volumes.values():
            folder.mkdir(parents=True)
        self.pods.append(pod)
        statuses: list[dict[str, Any]] = []
        waiting = [self._status(c, {"waiting": {"reason": "PodInitializing"}}) for c in spec["containers"]]
        for container in spec.get("initContainers") or []:
            done = self._run_to_end(pod, container, timeout)
            statuses.append(self._status(container, {"terminated": done}))
            if done["exitCode"] != 0:  # the pod stays Pending: its containers never start
                self._write(name, "Pending", statuses, waiting, initialized=False, ready=False)
                return pod
        main = spec["containers"][0]
        port = free_port()
        mapped = self._mapper(pod, main)
        runtime = self.runtimes[main["image"].rsplit(":", 1)[0]]
        pod.process = subprocess.Popen(
            runtime(main, mapped, port),
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        pod.url = f"http://127.0.0.1:{port}"
        probe = main.get("readinessProbe", {}).get("httpGet", {}).get("path", "/")
        process = pod.process

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{main['name']} of {name} exited ({process.returncode}) before it was ready")
            return self._answers(f"{pod.url}{probe}")

        wait_until(ready, f"{main['name']} of {name} to be ready", timeout)
        running = [self._status(main, {"running": {"startedAt": format_time()}}, ready=True)]
        self._write(name, "Running", statuses, running, initialized=True, ready=True)
        return pod

    def stop(self) -> None:
        for pod in self.pods:
            pod.stop()

    def _mapper(self, pod: RunningPod, container: Container) -> Callable[[str], str]:
        mounts = sorted(container.get("volumeMounts") or [], key=lambda m: -len(m["mountPath"]))

        def mapped(arg: str) -> str:
            for mount in mounts:
                path = mount["mountPath"].rstrip("/")
                if arg == path or arg.startswith(path + "/"):
                    return str(pod.volumes[mount["name"]]) + arg[len(path) :]
            return arg

        return mapped

    def _run_to_end(self, pod: RunningPod, container: Container, timeout: float) -> dict[str, Any]:
        command = [*(container.get("command") or []), *(container.get("args") or [])]
        if command[0] != "promptpipe":
            raise NotImplementedError(f"init container {container['name']}: only promptpipe commands run here")
        argv = [str(Path(sys.executable).parent / "promptpipe"), *map(self._mapper(pod, container), command[1:])]
        # Only what the pod would have: its env from the API server, no AWS keys of this test process.
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.root),
            **container_env(self.core, self.namespace, container, pod.name),
        }
        started = format_time()
        done = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, check=False)
        log = (done.stdout + done.stderr).decode(errors="replace")
        message = (
            log.encode()[-TERMINATION_MESSAGE_BYTES:].decode(errors="replace")
            if done.returncode and container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
            else ""
        )
        return {
            "exitCode": done.returncode,
            "reason": "Completed" if done.returncode == 0 else "Error",
            "message": message,
            "startedAt": started,
            "finishedAt": format_time(),
        }

    @staticmethod
    def _status(container: Container, state: dict[str, Any], ready: bool = False) -> dict[str, Any]:
        return {
            "name": container["name"],
            "image": container["image"],
            "imageID": "",
            "ready": ready,
            "restartCount": 0,
            "state": state,
        }

    def _write(
        self,
        name: str,
        phase: str,
        init: list[dict[str, Any]],
        containers: list[dict[str, Any]],
        initialized: bool,
        ready: bool,
    ) -> None:
        def condition(kind: str, ok: bool, reason: str) -> dict[str, Any]:
            return {
                "type": kind,
                "status": "True" if ok else "False",
                "lastTransitionTime": format_time(),
                **({} if ok else {"reason": reason}),
            }

        self.core.patch_namespaced_pod_status(
            name,
            self.namespace,
            {
                "status": {
                    "phase": phase,
                    "podIP": "127.0.0.1",
                    "podIPs": [{"ip": "127.0.0.1"}],
                    "startTime": format_time(),
                    "conditions": [
                        condition("Initialized", initialized, "ContainersNotInitialized"),
                        condition("ContainersReady", ready, "ContainersNotReady"),
                        condition("Ready", ready, "ContainersNotReady"),
                    ],
                    "initContainerStatuses": init,
                    "containerStatuses": containers,
                }
            },
        )

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return True
        except OSError:
            return False
