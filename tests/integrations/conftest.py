"""Point every Django test in this directory at one settings module (``django_settings.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_settings")

try:
    import django
except ImportError:  # the django extra is not installed: Django tests skip themselves
    django = None  # type: ignore[assignment]
else:
    django.setup()
