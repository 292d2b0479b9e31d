import sys

from . import worker

# With DIFFBIAS_WORKER=on the command runs in a preloaded worker process and this exits with its status
# (docs/worker.md); otherwise, or when no worker can take it, it runs here as before.
worker.delegate(sys.argv[1:])

from .cli import main  # noqa: E402

main()
