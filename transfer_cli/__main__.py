import sys

from transfer_cli.entry import main

sys.exit(main())
