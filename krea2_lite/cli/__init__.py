"""The command lines: `python -m krea2_lite SUBCOMMAND` (`subcommands.py`, one module per subcommand)
and `python -m krea2_lite.quantize` (`quantize.py`), their error contract (`error_contract.py`),
prompt files and the checks of their output paths. Arguments are checked by `krea2_lite.checks`, the
same functions the library uses."""
