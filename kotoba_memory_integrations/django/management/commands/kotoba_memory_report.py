"""``manage.py kotoba_memory_report [--html PATH] [--json] [--duration SECONDS]``.

Stops this process's optimizer (started from ``KOTOBA_MEMORY`` by the app, or started here for
``--duration`` seconds when autostart is off) and prints its report summary; ``--html`` also writes the
HTML report (its path is checked before anything is stopped), ``--json`` prints the report as JSON
instead of the summary. The report also lists every process of the app's running servers on this host
(``workers`` rows and ``fleet`` totals, read from the fleet spool the servers' workers write; see
``KOTOBA_MEMORY_FLEET``), so run from outside the server it shows the server's workers.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from kotoba_memory.report import private_dir
from kotoba_memory_integrations.django.apps import config_from_settings, fleet_name
from kotoba_memory_integrations.runtime import (
    fleet_spool,
    get_optimizer,
    start_optimizer,
    stop_optimizer,
    with_fleet,
)


class Command(BaseCommand):
    help = (
        "Print kotoba-memory's memory report for this process and every worker of the app's servers on "
        "this host (optionally write the HTML report)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--html", metavar="PATH", help="Also write the HTML report to PATH.")
        parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
        parser.add_argument(
            "--duration",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="Let the optimizer observe the process this long before reporting (default 0).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        duration = options["duration"]
        if not 0 <= duration <= 3600:
            raise CommandError(f"--duration must be between 0 and 3600 seconds, got {duration}")
        html = self._html_target(options["html"]) if options["html"] else None
        if get_optimizer() is None:
            try:
                config = config_from_settings()
            except (TypeError, ValueError) as exc:
                raise CommandError(f"KOTOBA_MEMORY is invalid: {exc}") from exc
            if config is None:
                from kotoba_memory.config import MemoryConfig

                config = MemoryConfig()
            start_optimizer(config)
        if duration:
            threading.Event().wait(duration)
        report = stop_optimizer()
        if report is None:  # another thread stopped it between our calls
            raise CommandError("the kotoba-memory optimizer was stopped concurrently; run the command again")
        name = fleet_name()
        spool = fleet_spool(name) if name else None
        if spool is not None:
            report = with_fleet(report, spool, viewer_pid=None)
        if options["json"]:
            self.stdout.write(json.dumps(report.to_dict(), indent=2, default=str))
        else:
            self.stdout.write(report.summary())
        if html is not None:
            path = report.write_html(html)
            self.stdout.write(f"HTML report written to {path}")

    @staticmethod
    def _html_target(value: str) -> Path:
        """The file ``--html`` names, checked writable *before* the optimizer is stopped (its run ends)."""
        target = Path(value)
        if target.is_dir():
            target = target / "report.html"
        try:
            private_dir(target.parent)
        except OSError as exc:
            raise CommandError(f"--html {value}: cannot create its directory: {exc}") from exc
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise CommandError(f"--html {value}: directory {target.parent} is not writable")
        return target
