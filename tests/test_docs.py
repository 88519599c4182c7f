"""The docs name only what exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_architecture_names_only_classes_that_exist_and_stays_one_page():
    """Every class-like name in docs/architecture.md is a class or interface of relay/ or client/; the page stays short."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 100
    named = {n for n in re.findall(r"`([A-Z][A-Za-z]+)`", text) if not n.isupper()}
    named |= set(re.findall(r"\b([A-Z][a-z]+(?:[A-Z][a-z]+)+)\b", text))
    source = "\n".join(p.read_text(encoding="utf-8") for p in [*ROOT.glob("relay/**/*.py"), *ROOT.glob("client/*.py")])
    defined = set(re.findall(r"^class (\w+)", source, re.MULTILINE))
    twisted_names = {"ITransport", "IConsumer", "IServiceMaker"}
    missing = sorted(n for n in named if n not in defined and n not in twisted_names)
    assert missing == []
