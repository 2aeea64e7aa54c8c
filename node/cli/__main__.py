"""``python -m node.cli``: the same as the ``iollm`` command."""

import sys

from node.cli.app import main

sys.exit(main())
