import sys

from imguard.cli import main

sys.exit(main())
