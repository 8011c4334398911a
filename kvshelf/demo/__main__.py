"""`python -m kvshelf.demo` (`make demo`)."""

import sys

from kvshelf.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
