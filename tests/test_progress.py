"""The CLI's progress bar: in place on a terminal, a line per quarter on a pipe, exact counts."""

import io

from slim_onnx.progress import ProgressBar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_pipe_gets_a_line_per_quarter():
    out = io.StringIO()
    bar = ProgressBar("calibrating", 8, stream=out)
    for _ in range(8):
        bar()
    lines = out.getvalue().splitlines()
    assert [line.split("]")[1].split()[0] for line in lines] == ["2/8", "4/8", "6/8", "8/8"]
    assert lines[-1].startswith("calibrating [" + "#" * 28 + "]")


def test_terminal_redraws_one_line():
    out = Terminal()
    bar = ProgressBar("layers", 3, stream=out, width=6)
    for _ in range(3):
        bar()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "[##....] 1/3" in text and "[######] 3/3" in text
