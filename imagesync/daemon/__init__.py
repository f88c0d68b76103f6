"""``imagesync daemon``: the long-running reconcile loop, in three rooms.

- :mod:`~imagesync.daemon.passes`: one pass (inventory, plan, execute) against the engine,
  and the :class:`PassReport` of what it did. Never raises.
- :mod:`~imagesync.daemon.health`: is the loop alive? Signs of life on an injected clock, and
  the thread that feeds the systemd watchdog only while it is.
- :mod:`~imagesync.daemon.process`: the :class:`Daemon` process: scheduler, SIGTERM/SIGHUP,
  reload, sd_notify, shutdown with a grace period; :func:`run_daemon` for the CLI.
- :mod:`~imagesync.daemon.live` and :mod:`~imagesync.daemon.statuspage`: what the daemon
  knows right now (fed by the pass and the executor's hooks), served read-only by the metrics
  listener as a status page (``/``) and ``/status.json``.
"""

from imagesync.daemon.health import STALL_SECONDS, Health
from imagesync.daemon.passes import PassReport, summarize_pass
from imagesync.daemon.process import GRACE_SECONDS, Daemon, run_daemon

__all__ = [
    "GRACE_SECONDS",
    "STALL_SECONDS",
    "Daemon",
    "Health",
    "PassReport",
    "run_daemon",
    "summarize_pass",
]
