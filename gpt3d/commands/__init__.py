"""One thin module per `gpt3d` subcommand: its flags (`register`) and a call into the library that does the work.
The CLI (gpt3d/cli.py) imports only the module of the command being run."""
