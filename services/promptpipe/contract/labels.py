"""Label and annotation keys on the objects the operator makes, and the ones users set."""

from __future__ import annotations

from promptpipe.contract.spec import GROUP

# The field manager of every server-side apply and the `app.kubernetes.io/managed-by` value.
MANAGER = "promptpipe-operator"

NAME = "app.kubernetes.io/name"
INSTANCE = "app.kubernetes.io/instance"  # the pipeline
COMPONENT = "app.kubernetes.io/component"  # a stage, `config` or `backend`
MANAGED_BY = "app.kubernetes.io/managed-by"

COLOR = f"{GROUP}/color"  # a backend's color: blue or green
MODEL_VERSION = f"{GROUP}/model-version"  # on a backend Deployment: the version it serves
CONFIG_HASH = f"{GROUP}/config-hash"  # on a stage's pod template: rolls the pods when the config changes
# A manual rollback is asked for by setting this annotation to a new value (`promptpipe rollback`,
# or `kubectl annotate pp NAME promptpipe.io/rollback="$(date +%s)" --overwrite`).
ROLLBACK = f"{GROUP}/rollback"
