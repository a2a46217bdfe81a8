"""Bad input at ingest: the fuzz set (tests/fuzzset.py) mixed into a good dataset, counted file by file.

Writes the embedded fabric dataset (``--images`` at ``--size`` px) and, under its ``images/fuzz/``, the
seeded fuzz set (random bytes, truncated and huge-header PNG/JPEG/TIFF/BMP/GIF/WebP, odd modes, empty files,
links out of the folder, a named pipe, repeated and hostile names, look-alikes of good images), ingests the
folder into a fresh workspace and prints what happened to every entry:

- tried: entries below ``images/`` counted without ingest (os.walk, links not followed);
- added / duplicates / quarantined (by kind of reason) as ingest reports them;
- lost: tried entries with no outcome (must be 0), and fuzz files whose outcome is not the expected one;
- wall time of the ingest and the process's peak resident memory.

    python benchmarks/fuzz_input.py --work /tmp/fuzz-input
    python benchmarks/fuzz_input.py --work /tmp/fuzz-input --images 240 --size 256
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(PROJECT_ROOT))  # tests.fuzzset: the generator the tests use
    from loom.config import load_settings
    from loom.data.ingest import ingest_folder
    from loom.datasets.fabric import generate
    from tests.fuzzset import ADDED, DUPLICATE, QUARANTINED, entries_below, pipes_guarded, write_fuzz_set

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    ap.add_argument("--images", type=int, default=60, help="good images in the dataset")
    ap.add_argument("--size", type=int, default=128, help="side of the good images, px")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    shutil.rmtree(args.work, ignore_errors=True)
    src = generate(args.work / "line3", n_images=args.images, size=args.size, seed=args.seed)
    good = sorted((src / "images").glob("*.png"))
    fuzz = write_fuzz_set(
        src / "images" / "fuzz", args.work / "elsewhere", seed=args.seed, look_alikes=good[:8]
    )
    settings = load_settings(args.work / "ws")

    start = time.perf_counter()
    with pipes_guarded(fuzz.fifos) as opened:
        report = ingest_folder(settings, src, round_no=1)
    wall = time.perf_counter() - start

    tried = [str(p) for p in entries_below(src / "images")]
    outcome = {p: ADDED for p in report.sources.values()}
    outcome |= {p: DUPLICATE for p in report.duplicates}
    outcome |= {p: QUARANTINED for p, _ in report.quarantined}
    lost = [p for p in tried if p not in outcome]
    wrong = [c for c in fuzz.cases if outcome.get(str(c.path)) != c.expected]
    reasons = dict(report.quarantined)
    wrong += [
        c
        for c in fuzz.cases
        if c.expected == QUARANTINED and not reasons.get(str(c.path), "").startswith(c.reason)
    ]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    expected = {kind: len(fuzz.expected(kind)) for kind in (QUARANTINED, ADDED, DUPLICATE)}
    print(
        f"fuzz set: {len(fuzz.cases)} files ({expected[QUARANTINED]} to quarantine, {expected[ADDED]} "
        f"readable, {expected[DUPLICATE]} duplicates); good set: {len(good)} images of {args.size} px"
    )
    print(
        f"tried {len(tried)} | added {len(report.added)} | duplicates {len(report.duplicates)} | "
        f"quarantined {len(report.quarantined)} | lost {len(lost)}"
    )
    print("quarantined by reason: " + ", ".join(f"{k} {n}" for k, n in report.quarantined_by_kind().items()))
    print(f"fuzz files with the expected outcome: {len(fuzz.cases) - len(wrong)}/{len(fuzz.cases)}")
    print(f"named pipes read: {len(opened)}")
    print(f"ingest wall time {wall:.2f} s, peak RSS {peak_mb:.0f} MB")
    for case in wrong:
        print(f"  unexpected: {case.path} ({case.kind}): expected {case.expected} {case.reason!r}")
    for path in lost:
        print(f"  lost: {path}")
    return 1 if lost or wrong or opened else 0


if __name__ == "__main__":
    raise SystemExit(main())
