"""``onegen eval`` run in-process, as a user runs it: exit code, stdout, stderr (never a
traceback)."""

from __future__ import annotations


def eval_cli(capsys, *args: str) -> tuple[int, str, str]:
    from orchestration.cli import main

    code = main(["eval", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err
