"""`python -m gemma3n.kernels`: build the native decode kernels now (scripts/setup.sh runs it)."""

import sys

from . import main

sys.exit(main())
