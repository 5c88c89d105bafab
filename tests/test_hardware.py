"""hardware.py: what the machine offers a run, and --device's one meaning in every script."""
import subprocess
import sys
import textwrap

import pytest
import torch

import hardware
import train
from cli import UsageError
from conftest import ROOT

def test_precision_auto_follows_the_hardware(monkeypatch):
    assert hardware.resolve_precision("32-true", "cpu") == "32-true"
    assert hardware.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    for native, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native,
                            raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert hardware.resolve_precision("auto", "cpu") == expected
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args: native)
        assert hardware.resolve_precision("auto", "gpu") == expected
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")     # an older torch
    assert hardware.resolve_precision("auto", "cpu") == "32-true"

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    # ten 64 MB tensors one after the other: glibc maps and page-faults each afresh (163,850
    # faults); after keep_freed_memory they reuse one tensor's worth of pages (16,384)
    script = textwrap.dedent("""
        import resource, sys, torch, train
        if sys.argv[1] == "keep":
            assert train.keep_freed_memory()
        torch.zeros(1 << 24)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            torch.zeros(1 << 24)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    faults = {}
    for mode in ("plain", "keep"):
        run = subprocess.run([sys.executable, "-c", script, mode], cwd=ROOT, text=True,
                             capture_output=True, check=True)
        faults[mode] = int(run.stdout.split()[-1])
    pages = 10 * (64 << 20) // 4096
    assert faults["plain"] > pages // 2 and faults["keep"] < pages // 5, faults

def test_fused_adam_where_torch_has_it():
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    assert hardware.fused_adam(torch.device("cpu")) == ((major, minor) >= (2, 4))

def test_resolve_device():
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert hardware.resolve_device("auto") == expected
    assert hardware.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not usable"):
        hardware.resolve_device("nonsense")


def test_device_means_one_thing_in_every_script():
    # render.py and view.py: the torch device to run on; a bare N is GPU N, as in train.py
    cpu_only = not torch.cuda.is_available()
    assert hardware.resolve_device("cpu") == torch.device("cpu")
    if cpu_only:
        for name in ("1", "cuda:1"):
            with pytest.raises(ValueError, match="not usable"):
                hardware.resolve_device(name)
    # train.py: the same names pick Lightning's accelerator and the GPU's index
    assert hardware.resolve_accelerator("auto", "cpu") == ("cpu", 0)
    assert hardware.resolve_accelerator("cpu", "auto") == ("cpu", 0)
    assert hardware.resolve_accelerator("cpu", "0") == ("cpu", 0)   # an old config.yaml's
    for accelerator, device, message in [("cpu", "cuda:1", "not a device of --accelerator cpu"),
                                         ("gpu", "cpu", "not a device of --accelerator gpu"),
                                         ("auto", "nonsense", "--device nonsense: expected")]:
        with pytest.raises(UsageError, match=message):
            hardware.resolve_accelerator(accelerator, device)
    if cpu_only:
        with pytest.raises(UsageError, match="no GPU is available"):
            hardware.resolve_accelerator("auto", "cuda:1")


def test_train_takes_the_device_flag_of_the_other_scripts(tmp_path, capsys):
    parser = train.build_parser()
    assert parser.parse_args([]).device == "auto"
    assert parser.parse_args(["--device", "1"]).device == "1"        # upstream's GPU index
    with pytest.raises(SystemExit) as exit:
        train.main(["--root", str(tmp_path), "--device", "cpu", "--accelerator", "gpu"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == \
        "train.py: error: --device cpu is not a device of --accelerator gpu"
