import sys

from r2m.cli import main

sys.exit(main())
