import sys

from fleet.ops.cli import main

sys.exit(main())
