"""``python -m bestformer`` (also what ``torchrun -m bestformer`` runs)."""

import sys

from .cli import main

sys.exit(main())
