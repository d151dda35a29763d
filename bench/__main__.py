"""``python -m bench``: see bench/README.md (``--quick`` for the short suite)."""
import sys

from .runner import main

sys.exit(main())
