"""The README's Python snippet runs as written, against this checkout's encoding.py."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_snippets():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        return re.findall(r"```python\n(.*?)```", readme.read(), flags=re.S)


def test_readme_python_snippet_runs(capsys):
    snippets = readme_snippets()
    assert snippets, "the README lost its Python snippet"
    for snippet in snippets:
        namespace = {}
        exec(compile(snippet, "README.md", "exec"), namespace)
    # the snippet's own claims hold
    assert namespace["features"].shape == (4096, 32)
    assert namespace["sdf"].shape == (4096, 1)
    assert namespace["enc"].embedding.weight.grad is not None
    assert namespace["pano"].resolutions[-1] == (28359, 10725)
    assert namespace["big"].embedding.weight.is_meta
    assert "MultiResHashGrid(" in capsys.readouterr().out
