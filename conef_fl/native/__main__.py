"""``python -m conef_fl.native build|status``: build the kernels ahead of time, or say whether they load.

``build`` exits 0 when the library is built (or already was), 1 with the compiler's message otherwise;
``scripts/setup.sh`` treats a failure as a warning (the pure-torch fallback is used).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from conef_fl import native


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m conef_fl.native", description=__doc__)
    p.add_argument("command", choices=("build", "status"))
    p.add_argument("--force", action="store_true", help="rebuild even if the library exists")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[conef_fl.native] %(message)s")
    log = logging.getLogger("conef_fl.native")
    if args.command == "build":
        t0 = time.monotonic()
        try:
            path = native.build(force=args.force)
        except RuntimeError as exc:
            log.warning("build failed; the pure-torch fallback will be used: %s", exc)
            return 1
        if not native.available():
            log.warning("built %s but it does not load; the pure-torch fallback will be used", path)
            return 1
        log.info("kernels ready: %s (%.1f s)", path, time.monotonic() - t0)
        return 0
    ok = native.available()
    log.info("kernels %s: %s", "load" if ok else "unavailable", native.library_path())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
