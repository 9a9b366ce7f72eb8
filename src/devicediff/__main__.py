import sys

from devicediff.cli import main

sys.exit(main())
