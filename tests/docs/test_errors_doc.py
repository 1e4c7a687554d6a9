"""docs/errors.md names every exception class of krea2_lite.errors (what errors mean stays true as
features add their own)."""

import inspect
import re
from pathlib import Path

import krea2_lite.errors as errors

DOC = Path(__file__).parents[2] / "docs" / "errors.md"


def test_every_error_class_is_explained():
    text = DOC.read_text()
    classes = [name for name, obj in vars(errors).items()
               if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == errors.__name__]
    assert len(classes) > 20
    missing = [name for name in classes if re.search(rf"`[\w.]*\b{name}`", text) is None]
    assert not missing, f"docs/errors.md does not explain {missing}"
