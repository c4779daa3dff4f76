"""`python -m agencyllm.serving.cli`: the same as the `agencyllm` command."""

import sys

from agencyllm.serving.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
