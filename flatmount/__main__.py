import sys

from flatmount.cli import main

sys.exit(main())
