import sys

from mera.cli import main

sys.exit(main())
