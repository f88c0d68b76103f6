"""``python -m imagesync.cli``: the same as the ``imagesync`` command."""

import sys

from imagesync.cli import main

sys.exit(main())
