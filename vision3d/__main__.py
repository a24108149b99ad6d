import sys

from vision3d.cli.main import main

sys.exit(main())
