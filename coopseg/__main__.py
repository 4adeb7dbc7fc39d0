"""`python -m coopseg ...` = the `coopseg` command."""
import sys

from coopseg.cli import main

sys.exit(main())
