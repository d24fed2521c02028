"""Run one installed Lotse service on the simulated clock (a subprocess of the platform).

``python -m lotse_simulator.serve SERVICE --port P --clock-file F``: the service's app
factory (entry point group ``lotse.services``, as ``lotse up`` uses it) is called with a
:class:`~lotse_simulator.clock.FileClock`; everything else comes from the environment.
"""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points
from pathlib import Path

import uvicorn

from lotse_simulator.clock import FileClock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lotse_simulator.serve")
    parser.add_argument("service")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--clock-file", type=Path, required=True)
    args = parser.parse_args(argv)
    found = {ep.name: ep for ep in entry_points(group="lotse.services")}
    if args.service not in found:
        parser.error(f"unknown service {args.service}; installed: {', '.join(sorted(found))}")
    factory = found[args.service].load()
    app = factory(clock=FileClock(args.clock_file))
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
