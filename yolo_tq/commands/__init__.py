"""One module per command: docstring (help), add_arguments(parser), run(args) -> int."""
