"""``python -m pagedkv``: the same as the ``pagedkv`` command."""

import sys

from .tools.cli import main

sys.exit(main())
