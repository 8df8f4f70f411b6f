import sys

from litestar_llm.cli import main

sys.exit(main())
