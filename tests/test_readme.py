"""The README's example runs as written."""

import pathlib
import re

import numpy as np


def test_readme_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README lost its Python example"
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
    res = scope["result"]
    assert sum(s.pruned for s in res.summary) == round(0.9 * (256 * 784 + 10 * 256))
    assert scope["y"].shape == (256,) and scope["mask"].dtype == np.bool_
