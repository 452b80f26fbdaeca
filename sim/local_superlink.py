"""Stop the SuperLink that ``flwr run .`` starts for its default ``local`` connection.

``flwr run .`` (Flower 1.41) starts a detached ``flower-superlink --simulation`` on
127.0.0.1:39091 (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``) that keeps running after the
run, with its logs and database under ``$FLWR_HOME/local-superlink/``. Flower has no
command to stop it; this one finds it by that folder in its command line and stops it
and every process below it (the simulation, Ray and its actors) by PID::

    python -m sim.local_superlink stop          # FLWR_HOME, else ~/.flwr
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from sim.flower_runtime import descendants, pid_alive, stop_pids

log = logging.getLogger("sim.local_superlink")


def flwr_home() -> Path:
    """``$FLWR_HOME``, else ``~/.flwr`` (Flower's default)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def local_superlink_pids(home: Path) -> list[int]:
    """PIDs of ``flower-superlink`` processes whose files live in ``<home>/local-superlink``."""
    marker = str(home.resolve() / "local-superlink") + "/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in cmd and marker in cmd:
            found.append(int(entry.name))
    return found


def stop_local_superlink(home: Path | None = None, timeout: float = 10.0) -> list[int]:
    """Stop the local SuperLink of ``home`` and its descendants; return the PIDs signalled."""
    home = home or flwr_home()
    pids: list[int] = []
    for pid in local_superlink_pids(home):
        pids += [pid, *descendants(pid)]
    stop_pids(pids, timeout)
    return pids


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["stop"])
    ap.parse_args(argv)
    home = flwr_home()
    pids = stop_local_superlink(home)
    left = [p for p in pids if pid_alive(p)]
    log.info("local SuperLink of %s: stopped %d process(es)%s", home, len(pids) - len(left),
             f", still alive: {left}" if left else "")
    return 1 if left else 0


if __name__ == "__main__":
    raise SystemExit(main())
