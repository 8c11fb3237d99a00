"""Where the tests find the offline copies of the datasets (tests never download).

One setting for the whole suite: ``pytest --data-dir=DIR``, else the environment variable ``BNLSTM_LIT_TEST_DATA``,
else the default offline copy beside the checkout. ``tests/conftest.py`` puts the option into the environment
variable when the session starts, so test modules, fixtures and the CLI subprocesses the tests start all read
:func:`data_root`. A test whose data is not there skips with a reason that names the missing path under it;
the session then ends with one line counting those skips.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the environment variable naming the folder
ENV = "BNLSTM_LIT_TEST_DATA"
#: the default offline copy beside the checkout
DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: the subfolders the tests read: the MNIST and PTB folders as the DataModules' download (download=true) writes
#: them, the text8 prefix zip, and the CNN sample files
LAYOUT = ("mnist/", "ptb/", "text8/text8_prefix.zip", "cnn_sample/")


def data_root() -> Path:
    """The folder holding the offline copies: ``$BNLSTM_LIT_TEST_DATA`` where set, else the default."""
    value = os.environ.get(ENV)
    return Path(value).expanduser().resolve() if value else DEFAULT
