"""The control-plane build recipe and PKI: pure functions, no Go, no processes. (That the API server
enforces RBAC and the controllers collect garbage is tested against the real thing, in
devcluster/test_controlplane.py.)"""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.devcluster import jaeger_trim
from tests.devcluster.build import keda_scaler_switch, staging_modules, tools_go, wrapper_gomod
from tests.devcluster.pki import make_pki

KUBERNETES_GOMOD = """module k8s.io/kubernetes

require (
\tk8s.io/api v0.0.0
\tgithub.com/spf13/cobra v1.8.1
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tk8s.io/kube-aggregator => ./staging/src/k8s.io/kube-aggregator
\tgithub.com/example/fork => github.com/example/fork v1.2.3
)
"""


def test_staging_modules_are_read_from_kubernetes_replace_block() -> None:
    assert staging_modules(KUBERNETES_GOMOD) == ["k8s.io/api", "k8s.io/client-go", "k8s.io/kube-aggregator"]


def test_wrapper_replaces_each_staging_module_with_its_published_version() -> None:
    gomod = wrapper_gomod(
        "promptpipe.local/controlplane",
        {"k8s.io/kubernetes": "v1.32.4"},
        {"k8s.io/api": "v0.32.4", "k8s.io/client-go": "v0.32.4"},
    )
    assert "\tk8s.io/kubernetes v1.32.4\n" in gomod
    assert "\tk8s.io/api => k8s.io/api v0.32.4\n" in gomod
    assert "\tk8s.io/client-go => k8s.io/client-go v0.32.4\n" in gomod
    assert "./staging" not in gomod
    assert tools_go(["k8s.io/kubernetes/cmd/kube-apiserver"]).startswith("//go:build tools\n")


def test_wrapper_replaces_a_module_by_a_folder_for_an_edited_copy() -> None:
    gomod = wrapper_gomod("promptpipe.local/jaeger", {"example.com/m": "v1.0.0"}, {"example.com/m": "./m"})
    assert "\texample.com/m => ./m\n" in gomod


def test_pki_chains_to_its_ca_with_the_right_identities() -> None:
    pki = make_pki()
    ca = x509.load_pem_x509_certificate(pki.ca.cert)
    server = x509.load_pem_x509_certificate(pki.server.cert)
    admin = x509.load_pem_x509_certificate(pki.admin.cert)
    for cert in (server, admin):
        assert cert.issuer == ca.subject
        ca_key = ca.public_key()
        assert isinstance(ca_key, ec.EllipticCurvePublicKey)
        cert.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    assert admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"


KEDA_BUILDER = """func buildScaler(ctx context.Context, triggerType string, config *C) (scalers.Scaler, error) {
\t// TRIGGERS-START
\tswitch triggerType {
\tcase "activemq":
\t\treturn scalers.NewActiveMQScaler(config)
\tcase "cpu":
\t\treturn scalers.NewCPUMemoryScaler(corev1.ResourceCPU, config)
\tcase "kafka":
\t\treturn scalers.NewKafkaScaler(ctx, config)
\tcase "prometheus":
\t\treturn scalers.NewPrometheusScaler(config)
\tdefault:
\t\treturn nil, fmt.Errorf("no scaler found for type: %s", triggerType)
\t}
\t// TRIGGERS-END
}
"""


def test_the_keda_build_keeps_only_the_scalers_the_project_uses() -> None:
    trimmed = keda_scaler_switch(KEDA_BUILDER, ("prometheus", "cpu"))
    assert 'case "prometheus":' in trimmed and 'case "cpu":' in trimmed
    assert "activemq" not in trimmed and "Kafka" not in trimmed
    assert 'no scaler found for type: %s", triggerType)' in trimmed, "any other type: KEDA's own error"
    assert trimmed.startswith("func buildScaler(") and trimmed.endswith("// TRIGGERS-END\n}\n")


def test_the_keda_build_stops_when_the_builders_layout_changed() -> None:
    with pytest.raises(RuntimeError, match="layout changed"):
        keda_scaler_switch(KEDA_BUILDER, ("prometheus", "memory"))


JAEGER_COMPONENTS = """package internal

import (
\t"github.com/open-telemetry/opentelemetry-collector-contrib/receiver/kafkareceiver"
\t"go.opentelemetry.io/collector/component"
\t"go.opentelemetry.io/collector/processor/batchprocessor"
\t"go.opentelemetry.io/collector/receiver/otlpreceiver"
\t"go.opentelemetry.io/collector/extension/zpagesextension"

\t"github.com/jaegertracing/jaeger/cmd/jaeger/internal/exporters/storageexporter"
\t"github.com/jaegertracing/jaeger/cmd/jaeger/internal/extension/jaegerquery"
\t"github.com/jaegertracing/jaeger/cmd/jaeger/internal/extension/jaegerstorage"
\t"github.com/open-telemetry/opentelemetry-collector-contrib/extension/healthcheckv2extension"
)

func (b builders) build() (otelcol.Factories, error) {
\tfactories.Extensions, err = b.extension(
\t\thealthcheckv2extension.NewFactory(),
\t\tzpagesextension.NewFactory(),
\t\tjaegerquery.NewFactory(),
\t\tjaegerstorage.NewFactory(),
\t)
\tfactories.Receivers, err = b.receiver(
\t\totlpreceiver.NewFactory(),
\t\tkafkareceiver.NewFactory(),
\t)
\tfactories.Exporters, err = b.exporter(
\t\tstorageexporter.NewFactory(), // generic exporter
\t)
\tfactories.Processors, err = b.processor(
\t\tbatchprocessor.NewFactory(),
\t)
}
"""


def test_the_jaeger_build_registers_only_the_components_the_tests_configure() -> None:
    trimmed = jaeger_trim.components(JAEGER_COMPONENTS)
    assert "kafkareceiver" not in trimmed and "zpagesextension" not in trimmed, "neither registered nor imported"
    for kept in jaeger_trim.KEPT_FACTORIES:
        assert f"\t\t{kept}.NewFactory()," in trimmed
    assert '\t"go.opentelemetry.io/collector/component"\n' in trimmed, "imports of no factory stay"


def test_the_jaeger_build_stops_when_jaegers_layout_changed() -> None:
    without_query = JAEGER_COMPONENTS.replace("\t\tjaegerquery.NewFactory(),\n", "")
    with pytest.raises(jaeger_trim.LayoutChanged, match="layout changed"):
        jaeger_trim.components(without_query)
    with pytest.raises(jaeger_trim.LayoutChanged, match="mappings"):
        jaeger_trim.main_go("package main\n\nfunc main() {}\n")
    with pytest.raises(jaeger_trim.LayoutChanged, match="storage types"):
        jaeger_trim.v1_factory("func (*Factory) getFactoryOfType(t string) {\n\tswitch t {\n\t}\n}\n")
