"""`python -m coopseg.cli ...` (and `torchrun ... -m coopseg.cli ...`) = the `coopseg` command."""
import sys

try:  # Ctrl-C while torch is still importing: the exit status of SIGINT, no traceback
    from coopseg.cli import main
except KeyboardInterrupt:
    sys.exit(130)

sys.exit(main())
