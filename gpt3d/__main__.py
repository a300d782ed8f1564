"""`python -m gpt3d` is the `gpt3d` command."""
import sys

from .cli import main

sys.exit(main())
