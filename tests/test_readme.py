"""The README's Python examples run as written, in order, and do what they say."""

import pathlib
import re

import jax
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 2, "README lost its quickstart examples"
    namespace: dict = {}
    with jax.numpy_dtype_promotion("standard"):
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    # The quickstart's claims: the state advanced by one batch, eval kept it, outputs normalized.
    assert int(namespace["state"].count) == 1
    y = np.asarray(namespace["y"])
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, atol=1e-3)
    assert namespace["layer"].use_running_average is True
