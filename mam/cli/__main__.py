import sys

from mam.cli import main

sys.exit(main())
