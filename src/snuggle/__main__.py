import sys

from snuggle.cli import main

sys.exit(main())
