#!/usr/bin/env python3
"""`python scripts/bench.py [--quick] ...`: runs the benchmark package
`scripts/bench/` (what it measures and how: its `__init__.py`; options:
`--help`). The same as `python -m scripts.bench` from the repository root.

Run it with the Python that has tunnel-relay installed (`pip install .`).
"""

import sys
from pathlib import Path

# Python puts this file's folder, scripts/, first on sys.path; the package is
# imported as `scripts.bench`, from the repository root, so that no module
# named `bench` (this file or the folder) is ever in play.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
