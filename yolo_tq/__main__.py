"""`python -m yolo_tq COMMAND [flags]`: the `yolo-tq` console script without the installed entry point."""

from .cli import main

main()
