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


def fuzz_main(one_input) -> None:
    """Run `one_input` under atheris with libFuzzer's command line (sys.argv)."""
    import atheris  # only here: replaying the corpus must not need it

    # Instrument what is loaded (relay.*, and the stdlib json/ipaddress code
    # it leans on), so coverage guides the mutations into their branches.
    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
