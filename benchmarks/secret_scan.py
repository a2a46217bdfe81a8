"""Scan a workspace for its own secrets and print what was scanned and how many hits
(loom/services/secretscan.py).

The Prefect flow-run logs are read from the workspace's Prefect server, so its stack should be up (the
ports come from LOOM_*_PORT or params.yaml as for every Loom command); without it the Prefect source is
reported as skipped and the exit status is 2. Exit status 1 when a secret is found, 0 when none is.
Secret values are never printed: a hit names the secret and the place.

    python benchmarks/secret_scan.py --workspace workspace
    LOOM_PREFECT_PORT=14200 python benchmarks/secret_scan.py --workspace /tmp/.../ws --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from loom.config import load_settings
from loom.services.secretscan import SOURCES, scan_workspace


def main(argv: list[str] | None = None) -> int:
    """Run the scan; the exit status tells hits (1) and unread sources (2) apart from a clean scan (0)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"comma list of {', '.join(SOURCES)}")
    parser.add_argument("--json", action="store_true", help="the report as JSON instead of lines")
    args = parser.parse_args(argv)

    settings = load_settings(args.workspace)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    started = time.perf_counter()
    report = scan_workspace(settings, sources=sources)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({**asdict(report), "seconds": round(seconds, 2)}, indent=2))
    else:
        print(f"workspace {settings.workspace} ({seconds:.1f} s)")
        print(report.summary())
    if report.hits:
        return 1
    return 2 if report.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
