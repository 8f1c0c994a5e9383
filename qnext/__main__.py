import sys

from qnext.cli import main

sys.exit(main())
