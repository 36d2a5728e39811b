"""`python -m moecompress` (and `accelerate launch -m moecompress ...`) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
