"""One module per command: its argument parser and a ``main(argv, prog)``; scripts and ``featstack`` call them."""

COMMANDS = {
    "extract": "featstack.commands.extract",
    "stack": "featstack.commands.stack",
    "submit": "featstack.commands.submit",
    "predict": "featstack.commands.predict",
    "serve": "featstack.commands.serve",
    "audit": "featstack.commands.audit",
}
