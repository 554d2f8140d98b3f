import sys

from shadowkv.cli import main

sys.exit(main())
