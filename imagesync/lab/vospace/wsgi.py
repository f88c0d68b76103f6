"""The uwsgi entry point of the lab VOSpace service (``uwsgi --wsgi-file`` loads this file).

Its configuration file is named by ``$IMAGESYNC_VOSPACE_CONFIG`` (see ``service.start``).
"""

from __future__ import annotations

from imagesync.lab.vospace.app import app_from_env

application = app_from_env()
