"""Jaeger's source cut to what the tests run: OTLP in, traces in memory, the query API out.

Jaeger's `cmd/jaeger` links every storage backend (Elasticsearch's typed client alone is 847 of its
2,326 packages), Kafka, Zipkin and the Prometheus exporter: about 6 minutes of a first build. The
tests configure `otlp` → `batch` → `jaeger_storage_exporter` with the `memory` backend, and the
`jaeger_storage`, `jaeger_query` and `healthcheckv2` extensions (tests/support/jaeger.py). These pure
functions rewrite the three files that register the rest; each stops with "layout changed" when a
Jaeger version no longer looks as expected, rather than building something else.
"""

from __future__ import annotations

import re

# The components the tests configure, by the package that makes each factory.
KEPT_FACTORIES = (
    "healthcheckv2extension",
    "jaegerquery",
    "jaegerstorage",
    "otlpreceiver",
    "batchprocessor",
    "storageexporter",
)
# jaeger_storage's backends: only memory is kept; the metric backends go too (the tests read no metrics
# from Jaeger).
DROPPED_BACKENDS = ("Badger", "GRPC", "Cassandra", "Elasticsearch", "Opensearch", "ClickHouse", "Prometheus")
DROPPED_DEFAULTS = ("badger", "grpc", "cassandra", "elasticsearch", "opensearch", "prometheus")


class LayoutChanged(RuntimeError):
    pass


def _expect(found: bool, what: str) -> None:
    if not found:
        raise LayoutChanged(f"Jaeger's source: {what} not found: its layout changed")


def _drop_imports(source: str, unused: tuple[str, ...]) -> str:
    """Drops the import lines of `unused` (import paths), each of which must be there."""
    for path in unused:
        line = re.compile(rf'^\t(?:\w+ )?"{re.escape(path)}"\n', re.MULTILINE)
        _expect(bool(line.search(source)), f"import {path}")
        source = line.sub("", source)
    return source


def components(source: str) -> str:
    """components.go with only the factories of KEPT_FACTORIES registered."""
    kept = KEPT_FACTORIES
    calls = re.findall(r"^\t\t(\w+)\.NewFactory\(\),.*\n", source, re.MULTILINE)
    _expect(all(k in calls for k in kept), f"a factory of {kept}")
    imports = dict(re.findall(r'^\t(?:\w+ )?"([^"]+/(\w+))"\n', source, re.MULTILINE))
    dropped = [path for path, name in imports.items() if name in calls and name not in kept]
    source = re.sub(
        r"^\t\t(\w+)\.NewFactory\(\),.*\n",
        lambda m: m.group(0) if m.group(1) in kept else "",
        source,
        flags=re.MULTILINE,
    )
    return _drop_imports(source, tuple(dropped))


def _drop_block(source: str, opening: re.Pattern[str], closing: str) -> tuple[str, int]:
    """Drops each block from a line matching `opening` to the first line after it equal to `closing`."""
    count = 0
    while match := opening.search(source):
        end = source.index(closing, match.end()) + len(closing)
        source = source[: match.start()] + source[end:]
        count += 1
    return source, count


def storage_config(source: str) -> str:
    """jaegerstorage/config.go with the memory trace backend only."""
    names = "|".join(DROPPED_BACKENDS)
    fields = re.compile(rf"^\t({names})\s+\*[\w.]+\s+`mapstructure:[^\n]*\n", re.MULTILINE)
    _expect(len(fields.findall(source)) == len(DROPPED_BACKENDS) + 2, "the backends' fields")  # ES, OS twice
    source = fields.sub("", source)
    source, types = _drop_block(source, re.compile(r"^type PrometheusConfiguration struct \{\n", re.M), "\n}\n")
    _expect(types == 1, "PrometheusConfiguration")
    defaults = "|".join(DROPPED_DEFAULTS)
    source, ifs = _drop_block(source, re.compile(rf'^\tif conf\.IsSet\("({defaults})"\) \{{\n', re.M), "\n\t}\n")
    _expect(ifs == len(DROPPED_DEFAULTS) + 2, "the backends' defaults")
    return _drop_imports(
        source,
        (
            "time",
            "github.com/jaegertracing/jaeger/internal/config/promcfg",
            "github.com/jaegertracing/jaeger/internal/storage/cassandra/config",
            "github.com/jaegertracing/jaeger/internal/storage/elasticsearch/config",
            "github.com/jaegertracing/jaeger/internal/storage/metricstore/prometheus",
            "github.com/jaegertracing/jaeger/internal/storage/v1/badger",
            "github.com/jaegertracing/jaeger/internal/storage/v1/cassandra",
            "github.com/jaegertracing/jaeger/internal/storage/v1/elasticsearch",
            "github.com/jaegertracing/jaeger/internal/storage/v2/clickhouse",
            "github.com/jaegertracing/jaeger/internal/storage/v2/grpc",
        ),
    )


def storage_extension(source: str) -> str:
    """jaegerstorage/extension.go starting the memory trace backend only."""
    names = "|".join(DROPPED_BACKENDS)
    source, cases = _drop_cases(source, names)
    _expect(cases == len(DROPPED_BACKENDS) + 2, "the backends' cases")
    source, helpers = _drop_block(
        source,
        re.compile(r"^// \w+ (?:retrieves|is a helper)[^\n]*\nfunc \(s? ?\*storageExt\) \w+Authenticator\(", re.M),
        "\n}\n",
    )
    _expect(helpers == 2, "the authenticator helpers")
    # The metric backends' loop has no case left that reads its config.
    loop = "\tfor metricStorageName, cfg := range s.config.MetricBackends {\n"
    _expect(loop in source, "the metric backends' loop")
    source = source.replace(loop, "\tfor metricStorageName := range s.config.MetricBackends {\n")
    return _drop_imports(
        source,
        (
            "go.opentelemetry.io/collector/extension/extensionauth",
            "github.com/jaegertracing/jaeger/internal/storage/elasticsearch/config",
            "github.com/jaegertracing/jaeger/internal/storage/metricstore/elasticsearch",
            "github.com/jaegertracing/jaeger/internal/storage/metricstore/prometheus",
            "github.com/jaegertracing/jaeger/internal/storage/v2/badger",
            "github.com/jaegertracing/jaeger/internal/storage/v2/cassandra",
            "github.com/jaegertracing/jaeger/internal/storage/v2/clickhouse",
            "github.com/jaegertracing/jaeger/internal/storage/v2/elasticsearch",
            "github.com/jaegertracing/jaeger/internal/storage/v2/grpc",
        ),
    )


def _drop_cases(source: str, names: str) -> tuple[str, int]:
    """Drops each `case cfg.<name> != nil:` of the backends' switches, up to the next case or default."""
    case = re.compile(rf"^\t\tcase cfg\.({names}) != nil:\n.*?(?=^\t\t(?:case|default)\b)", re.M | re.S)
    return case.subn("", source)


def main_go(source: str) -> str:
    """cmd/jaeger/main.go without the Elasticsearch index mappings subcommand."""
    line = "\tcommand.AddCommand(mappings.Command())\n"
    _expect(line in source, "the mappings subcommand")
    return _drop_imports(
        source.replace(line, ""), ("github.com/jaegertracing/jaeger/internal/storage/v1/elasticsearch/mappings",)
    )


def v1_factory(source: str) -> str:
    """The v1 storage meta-factory (which the query service's package imports) with memory and blackhole
    only: any other type gets its own "unknown storage type" error."""
    kinds = "cassandraStorageType|elasticsearchStorageType, opensearchStorageType|kafkaStorageType|badger" + (
        "StorageType|grpcStorageType"
    )
    case = re.compile(rf"^\tcase (?:{kinds}):\n\t\treturn \w+\.New\w*Factory\(\), \w+\n", re.M)
    source, cases = case.subn("", source)
    _expect(cases == 8, "the storage types' cases")
    storage = "github.com/jaegertracing/jaeger/internal/storage/v1/"
    return _drop_imports(
        source, tuple(storage + kind for kind in ("badger", "cassandra", "elasticsearch", "grpc", "kafka"))
    )


# Each rewritten file, by its path in Jaeger's module.
REWRITES = {
    "cmd/jaeger/main.go": main_go,
    "cmd/jaeger/internal/components.go": components,
    "cmd/jaeger/internal/extension/jaegerstorage/config.go": storage_config,
    "cmd/jaeger/internal/extension/jaegerstorage/extension.go": storage_extension,
    "internal/storage/v1/factory/factory.go": v1_factory,
}
