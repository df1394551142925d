import os

from django.apps import AppConfig


class LibraryConfig(AppConfig):
    name = "library"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        if os.environ.get("KOTOBA_EXAMPLE_METRICS", "1") == "1":
            from opentelemetry import metrics
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from opentelemetry.sdk.metrics import MeterProvider

            # kotoba_memory_integrations.django (listed earlier in INSTALLED_APPS) instrumented the global
            # provider because KOTOBA_MEMORY_OTEL is on; this makes that provider export to Prometheus.
            metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
