"""`python -m lora_anywhere.cli`: the same as the `lora-anywhere` command."""

import sys

from .commands import main

sys.exit(main())
