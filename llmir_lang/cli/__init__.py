"""The ``llmir`` command line's subcommands that need more than a few lines (``llmir_lang.__main__``
dispatches): ``extract`` (batch structured extraction), ``bench`` (the source tree's benchmarks)."""
