"""What the fuzz targets share: cutting an input at fuzzer-chosen points, and
the atheris entry point.

Each target module (`fuzz_*.py`) defines `one_input(data: bytes)`, which
returns normally for any input the code under test handles by its rules and
raises (AssertionError, or whatever escaped) for a finding. The one-input
functions import nothing from atheris, so `tests/fuzz/test_fuzz.py` replays
the corpus on machines without it; only `fuzz_main()` needs atheris.
"""

import sys

MAX_CUTS = 7


def cuts(data: bytes) -> tuple[list[int], bytes]:
    """Split points chosen by the input itself: the first byte's low 3 bits
    say how many 2-byte offsets follow; the rest is the body they cut."""
    if not data:
        return [], b""
    count = data[0] & MAX_CUTS
    header = data[1 : 1 + 2 * count]
    body = data[1 + 2 * count :]
    points = sorted({int.from_bytes(header[i : i + 2], "big") % (len(body) + 1) for i in range(0, len(header) - 1, 2)})
    return points, body


def pieces(body: bytes, points: list[int]) -> list[bytes]:
    """`body` cut at `points` (sorted offsets into it); joining them gives `body`."""
    out, start = [], 0
    for point in points:
        out.append(body[start:point])
        start = point
    out.append(body[start:])
    return out


def fuzz_main(target: str) -> None:
    """Run module `target`'s one_input under atheris, libFuzzer's command line in sys.argv."""
    import importlib

    import atheris  # only here: replaying the corpus must not need it

    # Re-import relay.* and the target under instrumentation, so coverage of
    # our code guides the mutations. Only relay.*: instrument_all() took 20 s
    # of start-up per target on this machine, longer than the runs CI affords.
    for name in list(sys.modules):
        if name == "relay" or name.startswith(("relay.", "tests.fuzz.fuzz_")):
            del sys.modules[name]
    with atheris.instrument_imports(include=["relay"]):
        one_input = importlib.import_module(target).one_input
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
