"""outputs.py: progress bars, signals, the output check."""
import os
import re
import signal
import time

import pytest

import outputs


def test_progress_bar_shows_an_eta_only_past_its_delay(capsys, monkeypatch):
    with outputs.progress_bar(4, "shown", "row", progress=True) as bar:
        time.sleep(0.2)
        bar.update(2)
        bar.refresh()
    assert re.search(r"shown:  50%.* 2/4 \[00:00<00:00", capsys.readouterr().err)  # elapsed<ETA
    with outputs.progress_bar(4, "quick", "row") as bar:   # done before PROGRESS_DELAY
        bar.update(4)
    assert "quick" not in capsys.readouterr().err
    monkeypatch.setattr(outputs, "PROGRESS_DELAY", 0.05)
    with outputs.progress_bar(4, "later", "row") as bar:
        time.sleep(0.2)
        bar.update(1)
    assert "later:  25%" in capsys.readouterr().err


def test_check_output_refuses_what_could_never_be_written(tmp_path):
    source = tmp_path / "src.png"
    source.write_bytes(b"x")
    os.link(source, tmp_path / "link.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "afile").write_text("x")
    for path, reason in ((source, "would overwrite the input"),
                         (tmp_path / "link.png", "would overwrite the input"),
                         (tmp_path / "folder.png", "is a folder"),
                         (tmp_path / "afile" / "out.png", "cannot write there")):
        with pytest.raises(ValueError) as error:
            outputs.check_output(str(path), str(source))
        assert str(error.value).startswith(f"{path}: {reason}")
    outputs.check_output(str(tmp_path / "new" / "out.png"), str(source))     # its folder made
    assert os.listdir(tmp_path / "new") == []


def test_signals_handled_restores_the_previous_handlers():
    caught = []
    before = signal.getsignal(signal.SIGTERM)
    with outputs.signals_handled(lambda signum, frame: caught.append(signum)):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
    assert caught == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) == before
    stop = outputs.Stopped(signal.SIGTERM, "stopped by SIGTERM at step 3")
    assert (stop.status, str(stop), stop.left) == (128 + 15, "stopped by SIGTERM at step 3", None)
