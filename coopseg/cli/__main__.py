"""`python -m coopseg.cli ...` (and `torchrun ... -m coopseg.cli ...`) = the `coopseg` command."""
import sys

from coopseg.cli import main

sys.exit(main())
