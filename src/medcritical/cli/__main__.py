import sys

from medcritical.cli import main

sys.exit(main())
