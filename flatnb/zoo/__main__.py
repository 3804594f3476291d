import sys

from flatnb.zoo.cli import main

sys.exit(main())
