"""The two constraints files agree: constraints-transformers4.txt (the transformers 4.57 test environment)
differs from constraints.txt only in transformers and the packages whose versions follow from it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)$")
# transformers 4.57 needs tokenizers <= 0.23.0 and huggingface_hub < 1.0; sentence-transformers 6 needs
# transformers 5, so the MiniLM package resolves to an older one there
FOLLOW_TRANSFORMERS = {"transformers", "tokenizers", "huggingface-hub", "sentence-transformers"}
# AdapterHub's adapters 1.3 requires transformers ~=4.57.6: it is installed in the transformers 4 stage only
ONLY_TRANSFORMERS4 = {"adapters"}


def pins(path: Path) -> dict[str, str]:
    found = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"{path.name}:{number}: {line!r} is not an exact pin (name==version)"
        name = re.sub(r"[-_.]+", "-", match["name"]).lower()
        assert name not in found, f"{path.name}:{number}: {name} is pinned twice"
        found[name] = match["version"]
    return found


def test_the_transformers4_constraints_pin_transformers_4_57_and_otherwise_agree_with_constraints_txt():
    main = pins(ROOT / "constraints.txt")
    tf4 = pins(ROOT / "constraints-transformers4.txt")

    assert tf4["transformers"].startswith("4.57."), tf4["transformers"]
    assert main["transformers"].split(".")[0] == "5", main["transformers"]
    disagree = {
        name: (main.get(name), version)
        for name, version in tf4.items()
        if name not in FOLLOW_TRANSFORMERS | ONLY_TRANSFORMERS4 and main.get(name) != version
    }
    assert not disagree, f"pinned unlike constraints.txt (there, here): {disagree}"
    assert not ONLY_TRANSFORMERS4 & set(main), (
        "a package of the transformers 4 stage only is pinned in constraints.txt"
    )
