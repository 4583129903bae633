"""Draw a saved graphdl model or IR text file with Graphviz.

    python tools/render_graph.py disk.gdl -o disk.svg [--grad] [--hide-params] [--collapse-layers]

The same tool is installed as the `graphdl-render` console script; see graphdl/cli.py.
"""

import sys
from pathlib import Path

# Run from a checkout without installing: the repository root holds the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graphdl.cli import render_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(render_main())
