import sys

from mcp_integration.cli import main

sys.exit(main())
