"""``python -m quickmerge`` = the ``quickmerge`` command (also ``torchrun -m quickmerge``)."""

import sys

from .cli import main

sys.exit(main())
